"""One runner for every stage (pipeline.cli.run_target): each stage, each way of starting it, started
twice at once: one of the two runs and seals, the other finds it sealed, the outputs are the bytes of
the chain's first run (but for timings); a third start changes nothing."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import CORE_MINI, REPO, WEBTEXT
from pipeline import cli, config, launch, plan, store
from pipeline.errors import StageError

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
TORCHRUN = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2"
STAGES = ("download", "tokenizer", "pretokenize", "bundle", "train", "core")


@pytest.fixture(scope="module")
def chain(repo_config, tmp_path_factory):
    """The smoke row (a 4-step training) with every stage sealed once, run by hand in chain order."""
    root = tmp_path_factory.mktemp("runner")
    cfg = copy.deepcopy(repo_config)
    cfg["store_dir"], cfg["work_dir"] = str(root / "store"), str(root / "work")
    cfg["datasets"]["webtext"]["base_url"] = str(WEBTEXT)
    cfg["core_bundles"]["core_mini"]["url"] = str(CORE_MINI)
    cfg["rows"]["smoke"]["train"].update(num_iterations=4, eval_every=-1, save_every=-1, eval_tokens=4096)
    cfg["rows"]["smoke"]["core"].update(max_per_task=4, bpb_tokens=4096)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    checked = config.check(cfg)
    p = plan.make_plan(checked)
    for stage in STAGES:
        done = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--row", "smoke", "--config", str(path)],
                              capture_output=True, text=True, env=ENV, cwd=root)
        assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "config": path, "cfg": checked, "plan": p}


def specs_of(chain, stage):
    return [chain["plan"].specs[k] for k in chain["plan"].rows["smoke"][stage]]


def snakemake_command(chain, stage, spec, nproc=1):
    """The shell command the stage's rule runs for `spec` (workflow/rules/*.smk)."""
    root, work = chain["cfg"]["store_dir"], chain["cfg"]["work_dir"]
    inputs, out = [os.path.join(root, r) for r in spec["inputs"]], store.store_dir(spec, root)
    if stage in ("train", "core"):
        spec = copy.deepcopy(spec)
        spec["settings"]["launch"]["nproc_per_node"] = nproc  # not in the key: the same store directory
        make = launch.train_command if stage == "train" else launch.core_command
        cmd = make(spec, inputs, out, work).replace("python -m", f"{sys.executable} -m")  # this test's python
        return cmd.replace("torchrun --standalone --nproc_per_node=2", TORCHRUN)
    return launch.stage_command(spec, inputs, out, work, threads=2).replace("python -m", f"{sys.executable} -m")


def command(chain, stage, way):
    by_hand = f"-m pipeline.{stage} -- --row smoke --config {chain['config']}"
    if way == "row":
        return f"{sys.executable} {by_hand}"
    if way == "torchrun":
        return f"{TORCHRUN} {by_hand}"
    (spec,) = specs_of(chain, stage)[:1]  # the first spec of the stage: what one Snakemake job runs
    return snakemake_command(chain, stage, spec, nproc=2 if way == "snakemake+torchrun" else 1)


def stored(dirs):
    """Each directory's manifest bytes and inode: a second seal would rewrite both."""
    return {d: ((d / store.MANIFEST).read_bytes(), (d / store.MANIFEST).stat().st_ino) for d in dirs}


TIMED = {"compression.json", "metrics.jsonl", "train_summary.json"}  # they record how long the run took
# they record the number of processes, and a sum over ranks whose last bits follow it
BY_PROCESSES = {"bpb.json", "core.json"}


def outputs_of(d, processes=1):
    """Each output file's sha256 as the manifest records it (the manifest itself holds times and pids),
    but for the files that cannot be the same bytes twice: timings, and with other than the chain's one
    process, what records the process count."""
    skip = TIMED | (BY_PROCESSES if processes != 1 else set())
    return {name: rec["sha256"] for name, rec in store.read_manifest(d)["outputs"].items() if name not in skip}


WAYS = [(stage, way) for stage in STAGES for way in ("row", "snakemake")] + [
    (stage, way) for stage in ("train", "core") for way in ("torchrun", "snakemake+torchrun")]


@pytest.mark.parametrize(("stage", "way"), WAYS, ids=[f"{s}-{w}" for s, w in WAYS])
def test_started_twice_at_once_it_runs_once(chain, stage, way):
    root = chain["cfg"]["store_dir"]
    specs = specs_of(chain, stage) if way != "snakemake" else specs_of(chain, stage)[:1]
    dirs = [store.store_dir(s, root) for s in specs]
    processes = 2 if "torchrun" in way else 1
    first = {d: outputs_of(d, processes) for d in dirs}
    for d in dirs:
        shutil.rmtree(d)
    cmd = command(chain, stage, way)
    procs = [subprocess.Popen(cmd, shell=True, stderr=subprocess.PIPE, text=True, env=ENV, cwd=chain["root"])
             for _ in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errs)
    for spec in specs:
        ran = [e.count(f"{stage} {spec['key']}: done in") for e in errs]
        skipped = [e.count(f"{stage} {spec['key']}: up to date") + e.count(f"{stage}-{spec['key']}: already done")
                   for e in errs]
        assert sorted(ran) == [0, 1] and sorted(skipped) == [0, 1] and ran != skipped, "\n---\n".join(errs)
    assert all(store.verify(d) == [] for d in dirs)
    assert {d: outputs_of(d, processes) for d in dirs} == first  # the same bytes as the chain's first run
    assert not any(store.work_dir(s, chain["cfg"]["work_dir"]).exists() for s in specs)  # scratch went with the seal
    before = stored(dirs)
    again = subprocess.run(cmd, shell=True, capture_output=True, text=True, env=ENV, cwd=chain["root"])
    assert again.returncode == 0 and "done in" not in again.stderr, again.stderr[-3000:]
    assert stored(dirs) == before


def test_a_seeded_row_by_hand_trains_each_seed(chain, tmp_path):
    """`python -m pipeline.train --row X` trains every seed of a seeded row (one spec each), and core under
    one torchrun evaluates each; the unseeded row's training is untouched."""
    cfg = yaml.safe_load(chain["config"].read_text())
    cfg["rows"]["smoke"]["seeds"] = [1, 2]
    path = tmp_path / "seeded.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    seeded = plan.make_plan(config.check(cfg)).rows["smoke"]
    specs = seeded["train"]
    assert len(specs) == 2
    unseeded = stored([store.store_dir(s, chain["cfg"]["store_dir"]) for s in specs_of(chain, "train")])
    done = subprocess.run([sys.executable, "-m", "pipeline.train", "--row", "smoke", "--config", str(path)],
                          capture_output=True, text=True, env=ENV, cwd=chain["root"])
    assert done.returncode == 0, done.stderr[-3000:]
    seeds = set()
    for key in specs:
        assert done.stderr.count(f"train {key}: done in") == 1
        out = Path(chain["cfg"]["store_dir"]) / "train" / key
        assert store.verify(out) == []
        seeds.add(store.read_manifest(out)["params"]["seed"])
    assert seeds == {1, 2}
    assert stored(list(unseeded)) == unseeded
    # and one torchrun evaluates both seeds in turn, in the one process group its ranks joined
    done = subprocess.run(f"{TORCHRUN} -m pipeline.core -- --row smoke --config {path}", shell=True,
                          capture_output=True, text=True, env=ENV, cwd=chain["root"])
    assert done.returncode == 0, done.stderr[-3000:]
    for key in seeded["core"]:
        assert done.stderr.count(f"core {key}: done in") == 1
        out = Path(chain["cfg"]["store_dir"]) / "core" / key
        assert store.verify(out) == [] and json.loads((out / "core.json").read_text())["world_size"] == 2


def test_an_unfinished_input_is_refused_before_anything_runs(chain, tmp_path):
    (spec,) = specs_of(chain, "core")
    (tmp_path / "train").mkdir()   # a train directory without its manifest: a run that was killed
    target = cli.Target(spec, [tmp_path / "train", *[tmp_path / "x"] * 4], tmp_path / "out", tmp_path / "work")
    ran = []
    with pytest.raises(StageError, match=r"train has no manifest.json: the stage that writes it did not finish"):
        cli.run_target(target, lambda *a, **k: ran.append(1))
    assert not ran and not (tmp_path / "out").exists()


def test_a_stage_that_does_not_seal_is_an_error(chain, tmp_path):
    (spec,) = specs_of(chain, "bundle")
    target = cli.Target(spec, [], tmp_path / "out", tmp_path / "work")
    with pytest.raises(StageError, match="ended without sealing"):
        cli.run_target(target, lambda *a, **k: None)


def test_a_spec_of_another_stage_is_refused(chain):
    (spec,) = specs_of(chain, "bundle")
    out = subprocess.run([sys.executable, "-m", "pipeline.tokenizer", "--spec", json.dumps(spec)],
                         capture_output=True, text=True, env=ENV, cwd=chain["root"])
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --spec is a 'bundle' spec; python -m pipeline.tokenizer runs tokenizer specs"


def test_core_by_hand_never_writes_into_the_store(chain, tmp_path):
    (train,) = [store.store_dir(s, chain["cfg"]["store_dir"]) for s in specs_of(chain, "train")]
    before = stored([train])
    out = subprocess.run([sys.executable, "-m", "pipeline.core", "--checkpoint", str(train), "--bundle",
                          str(CORE_MINI), "--max-per-task", "2", "--allow-missing-tasks", "--out",
                          str(train / "core.json")], capture_output=True, text=True, env=ENV, cwd=chain["root"])
    assert out.returncode == 2 and not (train / "core.json").exists()
    assert f"is inside the sealed store directory {train}" in out.stderr
    assert stored([train]) == before
    store_root = Path(chain["cfg"]["store_dir"])
    killed = store_root / "core" / ("0" * 16)  # a stage's directory as a kill leaves it: no manifest yet
    for where, said in ((killed / "core.json", f"the store directory {killed}"),
                        (store_root / "core.json", f"the store {store_root}")):
        refused = subprocess.run([sys.executable, "-m", "pipeline.core", "--checkpoint", str(train), "--bundle",
                                  str(CORE_MINI), "--config", str(chain["config"]), "--out", str(where)],
                                 capture_output=True, text=True, env=ENV, cwd=chain["root"])
        assert refused.returncode == 2 and f"is inside {said};" in refused.stderr, refused.stderr[-2000:]
        assert not where.exists()
    fine = subprocess.run([sys.executable, "-m", "pipeline.core", "--checkpoint", str(train), "--bundle",
                           str(CORE_MINI), "--max-per-task", "2", "--allow-missing-tasks", "--out",
                           str(tmp_path / "core.json")], capture_output=True, text=True, env=ENV, cwd=chain["root"])
    assert fine.returncode == 0, fine.stderr[-3000:]
    assert "(by hand: outside the store, no manifest" in fine.stderr
    assert json.loads((tmp_path / "core.json").read_text())["checkpoint_key"] == train.name
