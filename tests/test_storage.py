"""The store on shared or object storage: the smoke row through snakemake-storage-plugin-fs, with a
local directory standing in for the remote side (`--default-storage-provider fs`)."""

import json
import re
import shutil
from pathlib import Path

import pytest

from helpers import REPO, ShardServer, snakemake, write_config
from pipeline import config, plan, store

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("rsync") is None,
                                 reason="snakemake-storage-plugin-fs needs rsync (scripts/system-deps installs it)")]


@pytest.fixture(scope="module")
def remote_run(tmp_path_factory, smoke_run):
    work, remote = tmp_path_factory.mktemp("storage-work"), tmp_path_factory.mktemp("storage-remote")
    cfg = json.loads(json.dumps(smoke_run["cfg"]))
    args = ("--default-storage-provider", "fs", "--default-storage-prefix", str(remote))
    with ShardServer(REPO / "tests" / "fixtures" / "webtext") as server:
        cfg["datasets"]["webtext"]["base_url"] = server.url
        write_config(work, cfg)
        first = snakemake(work, *args)
        second = snakemake(work, *args)
    return {"work": work, "remote": remote, "first": first, "second": second, "args": args}


def test_every_artifact_lands_in_storage_and_verifies_there(remote_run):
    first, remote, work = remote_run["first"], remote_run["remote"], remote_run["work"]
    assert first.returncode == 0, first.stderr[-3000:]
    stores = sorted(p.parent for p in (remote / "results" / "store").glob("*/*/manifest.json"))
    assert {p.parent.name for p in stores} == {"download", "tokenizer", "pretokenize", "train", "bundle", "core"}
    assert all(store.verify(d) == [] for d in stores)
    for name in ("token_shards.json", "train_summary.json", "metrics.jsonl", "core.json", "manifest.json"):
        assert (remote / "results" / "smoke" / name).is_file(), name
    assert re.search(r"^\| smoke \| 0\.\d\d \|", (remote / "reports" / "leaderboard.md").read_text(), re.M)
    # the working directory keeps only scratch (resumable work, wandb), never a store or a row
    assert not (work / "results" / "store").exists() and not (work / "results" / "smoke").exists()


def test_the_same_keys_and_numbers_as_the_local_run(remote_run, smoke_run):
    here = smoke_run["dir"] / "results"
    there = remote_run["remote"] / "results"
    # the smoke row's keys by the plan (other tests add rows to smoke_run's store)
    row = plan.make_plan(config.check(smoke_run["cfg"])).rows["smoke"]
    keys = {Path(stage) / key for stage in plan.STAGES for key in row.get(stage, [])}
    assert keys <= {p.relative_to(here / "store") for p in (here / "store").glob("*/*")}
    assert keys == {p.relative_to(there / "store") for p in (there / "store").glob("*/*")}
    local, remote = (json.loads((d / "smoke" / "core.json").read_text()) for d in (here, there))
    assert remote["core_metric"] == local["core_metric"] and remote["tasks"] == local["tasks"]


def test_a_second_run_finds_everything_in_storage(remote_run):
    out = remote_run["second"]
    assert out.returncode == 0 and "Nothing to be done" in out.stdout + out.stderr, out.stderr[-2000:]
