"""SIGKILL each stage at a random point under Snakemake; rerunning the same target finishes with the same outputs.

Each test starts from a fresh directory holding a copy of the smoke run's store up to the stage under
test, so only that stage runs (and is killed). The kill lands a random, seeded delay after the stage
starts; the seed is printed (`FAULT_SEED=<n>` replays a run's delays).
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time

import pytest

from helpers import ENV, WEBTEXT, ShardServer, snakemake, snakemake_cmd, write_config
from pipeline import checkpoint, config, plan, store

pytestmark = [pytest.mark.fault, pytest.mark.slow]

SEED = int(os.environ.get("FAULT_SEED") or random.SystemRandom().randrange(1_000_000))
# Files whose bytes record timings, so differ from run to run; everything else a stage writes must not.
TIMED = {"tokenizer": {"compression.json"}}


# ----------------------------------------------------------------------------- helpers

def row_store_dir(smoke_run, stage):
    """The smoke row's store directory of `stage` (of two, the 3-shard train block, not the val shard); by
    the plan, as other tests add rows beside it in the same store."""
    cfg = config.check(json.loads(json.dumps(smoke_run["cfg"])))
    root = smoke_run["dir"] / "results" / "store"
    dirs = [root / stage / key for key in plan.make_plan(cfg).rows["smoke"][stage]]
    return max(dirs, key=lambda d: sum(r["size"] for r in store.read_manifest(d)["outputs"].values()))


def upstream(store_root, directory):
    """Every store directory (as 'stage/key') that `directory` was made from, transitively."""
    seen, todo = set(), list(store.read_manifest(directory)["inputs"])
    while todo:
        rel = todo.pop()
        if rel not in seen:
            seen.add(rel)
            todo += store.read_manifest(store_root / rel)["inputs"]
    return seen


def stage_seconds(smoke_dir, target):
    """How long the stage took in the smoke run (its Snakemake benchmark)."""
    tsv = smoke_dir / "results" / "benchmarks" / target.parent.name / f"{target.name}.tsv"
    return float(tsv.read_text().splitlines()[1].split("\t")[0])


def digests(directory, skip=()):
    manifest = store.read_manifest(directory)
    return {name: rec["sha256"] for name, rec in manifest["outputs"].items() if name not in skip}


def prepare(smoke_run, tmp_path, stage, base_url=None):
    """A fresh workdir with the smoke store's inputs of `stage` (mtimes kept); returns (workdir, target)."""
    src_store = smoke_run["dir"] / "results" / "store"
    target = row_store_dir(smoke_run, stage)
    for rel in upstream(src_store, target):
        shutil.copytree(src_store / rel, tmp_path / "results" / "store" / rel)
    cfg = json.loads(json.dumps(smoke_run["cfg"]))
    cfg["datasets"]["webtext"]["base_url"] = base_url or str(WEBTEXT)
    write_config(tmp_path, cfg)
    return tmp_path, target.relative_to(smoke_run["dir"])


def kill_mid_stage(workdir, target, started, delay):
    """Run Snakemake on `target`; `delay` seconds after `started()` holds, SIGKILL it and its jobs.
    Returns whether the stage had already sealed its output (the kill then missed the stage)."""
    log = workdir / "killed_run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(snakemake_cmd(workdir, str(target)), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=ENV)
    deadline = time.time() + 300
    while not started():
        assert proc.poll() is None, f"Snakemake ended before the stage started:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, "the stage never started"
        time.sleep(0.02)
    time.sleep(delay)
    missed = proc.poll() is not None or (workdir / target / store.MANIFEST).exists()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert snakemake(workdir, "--unlock").returncode == 0
    return missed


def kill_at_random(workdir, target, stage, seconds, started=None, low=0.2, high=0.8):
    """Kill the stage a seeded random fraction of `seconds` after it starts (its log appears); a kill
    that came after the stage had finished is retried sooner, so the kill always lands mid-stage."""
    rng = random.Random(f"{SEED}-{stage}")
    log_dir = workdir / "results" / "logs" / stage
    started = started or (lambda: log_dir.is_dir() and any(log_dir.iterdir()))
    delay = rng.uniform(low, high) * seconds
    for _ in range(4):
        print(f"FAULT_SEED={SEED}: SIGKILL {stage} {delay:.2f}s after it started")
        if not kill_mid_stage(workdir, target, started, delay):
            work = workdir / "results" / "work" / stage / target.name
            print(f"  left in {work.relative_to(workdir)}: {sorted(p.name for p in work.glob('*'))}")
            return delay
        print("  the stage had already finished; again, sooner")
        shutil.rmtree(workdir / target)
        shutil.rmtree(log_dir)
        delay /= 2
    pytest.fail(f"{stage} always finished before the kill")


def assert_sealed_dirs_verify(workdir):
    for manifest in (workdir / "results" / "store").glob(f"*/*/{store.MANIFEST}"):
        assert store.verify(manifest.parent) == [], manifest.parent


def rerun_only(workdir, target, stage):
    """Rerun the target; it must succeed and run no job but the stage's (the copied inputs stay)."""
    out = snakemake(workdir, str(target))
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = re.findall(r"^(?:local)?rule (\w+):", out.stdout + out.stderr, re.M)
    assert jobs == [stage], jobs
    assert store.verify(workdir / target) == []
    return out


# ----------------------------------------------------------------------------- one test per stage

def test_download_killed_mid_body_resumes_the_partial_shards(smoke_run, tmp_path):
    with ShardServer(WEBTEXT, pace=(32 << 10, 0.02)) as server:   # slow enough to kill mid-body
        workdir, target = prepare(smoke_run, tmp_path, "download", server.url)
        nbytes = max(r["size"] for r in store.read_manifest(smoke_run["dir"] / target)["outputs"].values())
        work = workdir / "results" / "work" / "download" / target.name
        # from the first bytes on disk to the end of the largest shard (the shards arrive in parallel)
        kill_at_random(workdir, target, "download", server.seconds_for(nbytes), low=0.0, high=1.0,
                       started=lambda: any(p.stat().st_size for p in work.glob("*.part")))
        assert_sealed_dirs_verify(workdir)
        parts = {p.name.removesuffix(".part"): p.stat().st_size for p in work.glob("*.part")}
        print(f"  partial shards at the kill: {parts}")
        server.requests.clear()
        rerun_only(workdir, target, "download")
        resumed = dict(server.requests)
    for name, size in parts.items():
        if size:  # what arrived before the kill is kept, and only the rest is fetched
            assert resumed[name] == f"bytes={size}-"
    assert digests(workdir / target) == digests(smoke_run["dir"] / target)


@pytest.mark.parametrize("stage", ["tokenizer", "pretokenize", "core"])
def test_stage_killed_at_random_reruns_to_the_same_bytes(smoke_run, tmp_path, stage):
    workdir, target = prepare(smoke_run, tmp_path, stage)
    kill_at_random(workdir, target, stage, stage_seconds(smoke_run["dir"], target))
    assert_sealed_dirs_verify(workdir)
    assert not (workdir / target / store.MANIFEST).exists()
    rerun_only(workdir, target, stage)
    skip = TIMED.get(stage, ())
    assert digests(workdir / target, skip) == digests(smoke_run["dir"] / target, skip)


def losses(train_dir):
    lines = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


def test_training_killed_after_a_checkpoint_resumes_to_the_same_loss(smoke_run, tmp_path):
    """The kill lands at a random point after the first checkpoint (step 10 of 20); the rerun resumes
    from the newest checkpoint there was and ends with the uninterrupted run's losses."""
    workdir, target = prepare(smoke_run, tmp_path, "train")
    ckpts = workdir / "results" / "work" / "train" / target.name / "checkpoints"
    seconds = stage_seconds(smoke_run["dir"], target)
    kill_at_random(workdir, target, "train", seconds, started=lambda: checkpoint.latest(ckpts) is not None,
                   low=0.0, high=0.3)
    assert_sealed_dirs_verify(workdir)
    newest = checkpoint.latest(ckpts)
    print(f"  newest checkpoint at the kill: {newest.name}")
    rerun_only(workdir, target, "train")
    (log,) = (workdir / "results" / "logs" / "train").glob("*.log")
    assert f"resuming from {newest.relative_to(workdir)}\n" in log.read_text()
    resumed, straight = losses(workdir / target), losses(smoke_run["dir"] / target)
    assert [s for s, _ in resumed] == list(range(1, 21))
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in straight], rel=1e-6)
    assert digests(workdir / target, {"train_summary.json", "metrics.jsonl"}) == \
        digests(smoke_run["dir"] / target, {"train_summary.json", "metrics.jsonl"})
