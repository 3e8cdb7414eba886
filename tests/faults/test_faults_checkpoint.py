"""Bad checkpoints met on resume: damaged, all damaged, asked for by step while damaged, of another model.

A damaged newest checkpoint (a file cut short or missing) is passed over with a warning and training
resumes from the one before, which is what a rerun after a crash should do without help; one of another
model config is somebody else's and is refused, as is a damaged checkpoint asked for by name. Resuming
on another number of processes is tests/test_train.py::test_a_checkpoint_from_one_process_resumes_on_two.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint, launch, plan, store, train

pytestmark = pytest.mark.bad_input


def train_spec(smoke_data, **changes):
    p = smoke_data["plan"]
    spec = p.specs[p.rows["smoke"]["train"][0]]
    params = {**spec["params"], "num_iterations": 6, "save_every": 2, "eval_every": -1, **changes}
    spec = plan.make_spec("train", params, spec["inputs"], settings=spec["settings"])
    return spec, [Path(smoke_data["cfg"]["store_dir"]) / r for r in spec["inputs"]]


@pytest.fixture(scope="module")
def interrupted(smoke_data, tmp_path_factory):
    """A 6-step run that died at step 5: (spec, inputs, work root) with checkpoints at steps 2 and 4."""
    spec, inputs = train_spec(smoke_data)
    work = tmp_path_factory.mktemp("interrupted")
    real = train.Trainer.train_step

    def dies_at_5(self):
        if self.step == 5:
            raise RuntimeError("killed")
        return real(self)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on a busy 2-core CI machine run ~8x slower
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        mp.setattr(train.Trainer, "train_step", dies_at_5)
        with pytest.raises(RuntimeError, match="killed"):
            train.main(launch.train_argv(spec, inputs, work / "out", work))
    yield spec, inputs, work
    torch.set_num_threads(threads)


@pytest.fixture
def resumed(interrupted, tmp_path, monkeypatch):
    """A copy of the interrupted run's work: (spec, inputs, work root, checkpoints, rerun(*extra_argv) -> status)."""
    spec, inputs, src = interrupted
    work = tmp_path / "work"
    shutil.copytree(src, work, ignore=shutil.ignore_patterns("out"))
    ckpts = store.work_dir(spec, work) / "checkpoints"
    assert [p.name for p in checkpoint.step_dirs(ckpts)] == ["step_000002", "step_000004"]
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "out"
    return spec, inputs, out, ckpts, lambda *extra: train.main([*launch.train_argv(spec, inputs, out, work), *extra])


def cut_short(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def one_error_line(err):
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


DAMAGE = {
    "model.pt cut short": lambda d: cut_short(d / "model.pt"),
    "optim.pt missing": lambda d: (d / "optim.pt").unlink(),
    "meta.json cut short": lambda d: cut_short(d / "meta.json"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(resumed, capsys, damage):
    spec, inputs, out, ckpts, rerun = resumed
    DAMAGE[damage](ckpts / "step_000004")
    assert rerun() == 0
    err = capsys.readouterr().err
    assert f"warning: checkpoint {ckpts / 'step_000004'} is damaged (" in err
    assert "; resuming from the older step_000002 instead\n" in err
    assert f"resuming from {ckpts / 'step_000002'}\n" in err
    assert store.verify(out) == []
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 6]  # the losses once each (3 and 4 again), then the final evaluation


def test_every_checkpoint_damaged_is_refused_naming_each(resumed, capsys):
    spec, inputs, out, ckpts, rerun = resumed
    cut_short(ckpts / "step_000002" / "model.pt")
    cut_short(ckpts / "step_000004" / "optim.pt")
    assert rerun() == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: no checkpoint under {ckpts} reads back whole: checkpoint {ckpts / 'step_000004'} "
                           "is damaged (optim.pt is ")
    assert f"checkpoint {ckpts / 'step_000002'} is damaged (model.pt is " in line
    assert line.endswith(f". Delete {ckpts} to train from step 0")
    assert not (out / store.MANIFEST).exists()


def test_a_damaged_checkpoint_asked_for_by_step_is_refused(resumed, capsys):
    spec, inputs, out, ckpts, rerun = resumed
    cut_short(ckpts / "step_000004" / "model.pt")
    assert rerun("--resume-from-step=4") == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: checkpoint {ckpts / 'step_000004'} is damaged (model.pt is ")
    assert line.endswith(": pass --resume-from-step with another step, or drop it to resume from the newest "
                         "checkpoint that reads back whole")
    assert rerun("--resume-from-step=2") == 0  # what the message offers works
    assert f"resuming from {ckpts / 'step_000002'}\n" in capsys.readouterr().err


def test_a_checkpoint_of_another_depth_is_refused(resumed, smoke_data, tmp_path, capsys):
    spec, inputs, out, ckpts, rerun = resumed
    deeper, _ = train_spec(smoke_data, depth=4)
    args = train.parse_args(launch.flag_args(deeper["params"]))
    other = train.Trainer(args, deeper, inputs, tmp_path / "other", tmp_path / "other_work")
    other.build()
    other.step = 8
    other.save()  # a depth-4 step_000008, newer than the run's own, where it does not belong
    shutil.move(other.ckpt_dir / "step_000008", ckpts / "step_000008")
    assert rerun() == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: checkpoint {ckpts / 'step_000008'} is of another model (n_layer 4 there, 2 here, ")
    assert line.endswith(f"so not this run's: move or delete {ckpts / 'step_000008'}, then rerun (or pass "
                         "--resume-from-step with one of this run's)")
    assert rerun("--resume-from-step=4") == 0  # as the message says
    assert f"resuming from {ckpts / 'step_000004'}\n" in capsys.readouterr().err
    assert json.loads((out / "model.json").read_text())["config"]["n_layer"] == 2  # its own model, not the stray one
