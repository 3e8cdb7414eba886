"""Training for real on CPU: the smoke row's tiny GPT on the shipped web text."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO, unlocked
from pipeline import checkpoint, launch, plan, store, train
from pipeline import recipe as recipes
from pipeline.errors import StageError
from pipeline.model import GPT

pytestmark = pytest.mark.slow
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def smoke(smoke_data):
    spec = smoke_data["plan"].specs[smoke_data["plan"].rows["smoke"]["train"][0]]
    inputs = [smoke_data["root"] / "store" / r for r in spec["inputs"]]
    return spec, inputs


def with_params(spec, **changes):
    """The smoke spec with other training flags (a new key, as the plan would give it)."""
    params = {**spec["params"], **changes}
    return plan.make_spec("train", params, spec["inputs"], settings=spec["settings"])


def train_subprocess(spec, inputs, tmp, nproc=1):
    out, work = tmp / "out", tmp / "work"
    argv = launch.train_argv(spec, inputs, out, work)
    if nproc == 1:
        cmd = [sys.executable, "-m", "pipeline.train", *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pipeline.train", "--", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stderr


def metrics(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "val_bpb" in r]


@pytest.fixture(scope="module")
def single(smoke, tmp_path_factory):
    spec, inputs = smoke
    return train_subprocess(spec, inputs, tmp_path_factory.mktemp("single"))


def test_loss_falls_on_real_text(single, smoke):
    out, _ = single
    steps, evals = metrics(out)
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert steps[0]["loss"] == pytest.approx(8.32, abs=0.05)          # ln(4096): uniform at init
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.4
    assert [e["step"] for e in evals] == [0, 10, 20]
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"] - 0.2


def test_summary_and_manifest(single, smoke):
    out, _ = single
    spec, _ = smoke
    summary = json.loads((out / "train_summary.json").read_text())
    hp = json.loads((out / "manifest.json").read_text())["resolved"]
    assert summary["step"] == 20 and summary["tokens"] == 20 * 4096
    assert summary["timed_steps"] == 9                       # steps 0-10 are warm-up, untimed
    assert summary["total_training_time"] > 0
    assert summary["total_training_flops"] == hp["flops_per_token"] * 4096 * 20
    assert summary["val_bpb"] == summary["min_val_bpb"] and summary["peak_memory_bytes"] > 0
    assert summary["window_attention"] == "masked"           # the smoke row's "SSSL" windows, on a CPU
    assert hp["grad_accum_steps"] == 2 and hp["num_iterations"] == 20
    assert store.verify(out) == []
    model = GPT(train.GPTConfig(**json.loads((out / "model.json").read_text())["config"]))
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))  # a complete, loadable model


def test_two_processes_give_the_same_loss_curve(single, smoke, tmp_path):
    spec, inputs = smoke
    two = {**spec, "settings": {**spec["settings"], "launch": {"nproc_per_node": 2, "nodes": 1}}}
    out, log = train_subprocess(two, inputs, tmp_path, nproc=2)
    one_steps, one_evals = metrics(single[0])
    two_steps, two_evals = metrics(out)
    assert json.loads((out / "train_summary.json").read_text())["world_size"] == 2
    assert json.loads((out / "manifest.json").read_text())["resolved"]["grad_accum_steps"] == 1
    assert [r["loss"] for r in two_steps] == pytest.approx([r["loss"] for r in one_steps], rel=2e-3)
    assert [e["val_bpb"] for e in two_evals] == pytest.approx([e["val_bpb"] for e in one_evals], rel=2e-3)


def test_fp8_runs_on_cpu_and_names_the_layers(smoke, tmp_path):
    spec, inputs = smoke
    fp8 = with_params(spec, fp8=True, num_iterations=3, eval_every=-1, save_every=-1)
    out, log = train_subprocess(fp8, inputs, tmp_path)
    layers = json.loads((out / "train_summary.json").read_text())["fp8_layers"]
    assert "lm_head (128->4096)" in layers["converted"]
    assert "transformer.h.0.attn.c_q (128->128)" in layers["converted"]
    # 1 output: not divisible by 16 (the newest recipe: 12-channel value-embedding gate, 24-channel smear gate)
    assert layers["skipped"] == ["transformer.h.1.attn.ve_gate (12->1)", "smear_gate (24->1)"]
    assert "skipped (dims not divisible by 16, or under 128): transformer.h.1.attn.ve_gate" in log


def test_fp8_leaves_small_layers_to_bf16_from_324e69c():
    """From 324e69c nanochat converts only Linear layers with both dims >= 128; before, any multiple of 16."""
    def converted(min_dim):
        model = GPT(train.GPTConfig(sequence_len=16, vocab_size=512, n_layer=2, n_head=1, n_embd=64))
        return train.convert_fp8(model, "tensorwise", min_dim, emulate=True)[0]
    assert "transformer.h.0.mlp.c_fc (64->256)" in converted(recipes.knobs("a67eba3")["fp8_min_dim"])
    assert converted(recipes.knobs("324e69c")["fp8_min_dim"]) == []


def test_compiled_fp8_training_runs_and_says_so(single, smoke, tmp_path):
    """The d26_fp8 row's GPU path short of the GPU: the train stage with torch.compile around torchao's
    Float8Linear layers (emulated on CPU) trains, and its summary says it was compiled. (Its losses
    drift from eager's by up to 0.5% over 20 steps, as any change of rounding does at this learning
    rate; test_model checks that compile computes the same loss and gradients.)"""
    spec, inputs = smoke
    compiled = with_params(spec, fp8=True, compile="yes", num_iterations=10, eval_every=-1, save_every=-1)
    out, _ = train_subprocess(compiled, inputs, tmp_path)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["compiled"] and summary["fp8_layers"]["converted"] and summary["compile_reason"] == "--compile=yes"
    smoke_summary = json.loads((single[0] / "train_summary.json").read_text())
    assert smoke_summary["compiled"] is False  # auto: 20 steps at d2 cannot pay a compile back
    assert smoke_summary["compile_reason"].startswith("auto: CPU") and "eager" in smoke_summary["compile_reason"]
    assert f"compile: no ({smoke_summary['compile_reason']})" in single[1]  # and the log says so
    losses = [r["loss"] for r in metrics(out)[0]]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.1


def test_flags_that_differ_from_the_spec_are_refused(smoke, tmp_path, capsys):
    spec, inputs = smoke
    argv = launch.train_argv(spec, inputs, tmp_path / "o", tmp_path / "w")
    assert train.main([*argv, "--depth=4"]) == 2
    assert "--depth=4 differs from the spec's 2" in capsys.readouterr().err
    assert train.main([*argv, "--fp8"]) == 2


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(smoke, tmp_path, monkeypatch):
    spec, inputs = smoke
    spec = with_params(spec, save_every=2, eval_every=-1)
    args = train.parse_args(launch.flag_args(spec["params"]))
    calls = {"n": 0}
    real = GPT.forward

    def poisoned(self, idx, targets=None, loss_reduction="mean"):
        out = real(self, idx, targets, loss_reduction)
        calls["n"] += targets is not None
        return out * float("nan") if calls["n"] > 10 else out  # 2 micro-batches a step: step 5 goes bad

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(GPT, "forward", poisoned)
    work = tmp_path / "work"
    with pytest.raises(StageError, match="loss became nan at step 5"):
        train.Trainer(args, spec, inputs, tmp_path / "out", work).run()
    assert [p.name for p in checkpoint.step_dirs(work / "checkpoints")] == ["step_000002", "step_000004"]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_launch_commands():
    spec = plan.make_spec("train", {"depth": 26, "fp8": True, "device_batch_size": 16}, [],
                          settings={"run": "r", "launch": {"nproc_per_node": 8, "nodes": 1}})
    locked = launch.train_command(spec, ["a", "b"], "out", "work")
    # one lock holder for the whole launcher, named by stage and key, done once the manifest exists
    assert locked.startswith(f"OMP_NUM_THREADS=1 python -m pipeline.keylock --work work --name train-{spec['key']} "
                             "--done out/manifest.json -- torchrun ")
    cmd = unlocked(locked)
    assert cmd.startswith("OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=8 -m pipeline.train -- "
                          "--run=r --depth=26 --fp8 --device-batch-size=16 --spec ")
    assert cmd.endswith("--inputs a b --out out --work work")
    cpu = plan.make_spec("train", {"depth": 2, "device_type": "cpu"}, [], settings={"launch": {"nproc_per_node": 1,
                                                                                                "nodes": 1}})
    cpu_cmd = unlocked(launch.train_command(cpu, [], "o", "w"))
    assert cpu_cmd.startswith("python -m pipeline.train --depth=2 --device-type=cpu")
    assert launch.gpus(spec) == 8 and launch.gpus(cpu) == 0


@pytest.mark.bad_input  # a checkpoint resumed by another number of processes must work
def test_a_checkpoint_from_one_process_resumes_on_two(single, smoke, tmp_path, monkeypatch):
    spec, inputs = smoke
    args = train.parse_args(launch.flag_args(spec["params"]))
    real = train.Trainer.train_step

    def dies_at_15(self):
        if self.step == 15:
            raise RuntimeError("killed")
        return real(self)

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(train.Trainer, "train_step", dies_at_15)
    work = tmp_path / "work"
    with pytest.raises(RuntimeError, match="killed"):
        train.Trainer(args, spec, inputs, tmp_path / "out", store.work_dir(spec, work)).run()
    assert checkpoint.latest(store.work_dir(spec, work) / "checkpoints").name == "step_000010"
    monkeypatch.undo()
    two = {**spec, "settings": {**spec["settings"], "launch": {"nproc_per_node": 2, "nodes": 1}}}
    out, log = train_subprocess(two, inputs, tmp_path, nproc=2)
    assert "resuming from" in log
    resumed, _ = metrics(out)
    straight, _ = metrics(single[0])
    assert [r["step"] for r in resumed] == list(range(1, 21))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=2e-3)


@pytest.mark.bad_input  # the other way round: two processes' checkpoint, resumed by one
def test_a_checkpoint_from_two_processes_resumes_on_one(single, smoke, tmp_path):
    spec, inputs = smoke
    two = {**spec, "settings": {**spec["settings"], "launch": {"nproc_per_node": 2, "nodes": 1}}}
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "pipeline.train", "--", *launch.train_argv(two, inputs, out, work)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**ENV, "OMP_NUM_THREADS": "1"})
    ckpts = store.work_dir(spec, work) / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts / "step_000010").is_dir():
        assert proc.poll() is None and time.time() < deadline, "two-process training ended before its checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)   # mid-run, after step 10's checkpoint
    proc.wait()
    assert not (out / "manifest.json").exists()
    resumed_out, log = train_subprocess(spec, inputs, tmp_path)
    assert "resuming from" in log and "step_000010" in log
    resumed, _ = metrics(resumed_out)
    straight, _ = metrics(single[0])
    assert resumed[0]["step"] <= 11 and resumed[-1]["step"] == 20
    by_step = {r["step"]: r["loss"] for r in straight}
    assert [r["loss"] for r in resumed] == pytest.approx([by_step[r["step"]] for r in resumed], rel=2e-3)


def test_disabled_wandb_is_not_even_imported(monkeypatch):
    """WANDB_MODE=disabled runs where wandb is not installed (the GPU image the device checks use)."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails
    args = train.build_parser().parse_args(["--run=r"])
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert train.start_wandb(args, {}, None) is None
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ImportError):
        train.start_wandb(args, {}, None)
