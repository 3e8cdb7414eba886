"""The Snakefile end to end, in a scratch directory, with shards served over loopback HTTP."""

import json
import os
import re
import signal
import subprocess
import time

import pytest
import yaml

from conftest import ENV, REPO, snakemake, snakemake_cmd, unlocked, write_config
from pipeline import store

pytestmark = pytest.mark.slow
def kill_snakemake_once(workdir, target, started, timeout):
    """Start Snakemake on `target`, SIGKILL it and its jobs as soon as `started()` holds, then unlock."""
    proc = subprocess.Popen(snakemake_cmd(workdir, target), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=ENV)
    deadline = time.time() + timeout
    while not started() and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert snakemake(workdir, "--unlock").returncode == 0


def test_smoke_chain_runs_from_loopback_downloads_to_token_shards(smoke_run):
    assert smoke_run["first"].returncode == 0, smoke_run["first"].stderr[-3000:]
    assert smoke_run["requested"] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet",
                                      "shard_00006.parquet"]
    work = smoke_run["dir"]
    summary = json.loads((work / "results" / "smoke" / "token_shards.json").read_text())
    assert summary["train_shards"] == 3 and summary["train_documents"] == 3072
    assert summary["val"]["shards"] == ["shard_00006"]
    stores = sorted(p.parent for p in (work / "results" / "store").glob("*/*/manifest.json"))
    assert [p.parent.name for p in stores].count("download") == 2
    assert {p.parent.name for p in stores} == {"download", "tokenizer", "pretokenize", "train", "bundle", "core"}
    assert all(store.verify(p) == [] for p in stores)
    # every rule left its log and benchmark
    assert list((work / "results" / "logs" / "tokenizer").glob("*.log"))
    assert list((work / "results" / "benchmarks" / "pretokenize").glob("*.tsv"))
    summary = json.loads((work / "results" / "smoke" / "train_summary.json").read_text())
    assert summary["step"] == 20 and summary["val_bpb"] < 4
    core = json.loads((work / "results" / "smoke" / "core.json").read_text())
    assert core["tasks_evaluated"] == 18 and core["partial"] and not core["comparable_to_gpt2"]
    assert core["missing_tasks"] == ["hellaswag_zeroshot", "hellaswag", "squad", "coqa"]
    assert all(t["items"] == 8 for t in core["tasks"].values())
    chain = json.loads((work / "results" / "smoke" / "manifest.json").read_text())["chain"]
    assert set(chain) == {"download", "tokenizer", "pretokenize", "train", "bundle", "core"}
    board = smoke_run["first_board"]   # the page drawn by the same run that made the row
    assert re.search(r"^\| smoke \| 0\.\d\d \| 3\.\d+ \| -?0\.\d+ \(partial: 18 tasks\) \|", board, re.M)
    assert "| d26_fp8 |" not in board and "| 2 (ours) | not run |" in board


def test_second_run_does_nothing(smoke_run):
    """Nothing runs again, the report included."""
    out = smoke_run["second"]
    assert out.returncode == 0
    assert "Nothing to be done" in out.stdout + out.stderr, out.stderr[-2000:]
    third = snakemake(smoke_run["dir"], "results/smoke/core.json", "reports/leaderboard.md")
    assert "Nothing to be done" in third.stdout + third.stderr


def test_changing_a_training_flag_leaves_the_data_up_to_date(smoke_run):
    cfg = json.loads(json.dumps(smoke_run["cfg"]))
    cfg["rows"]["smoke"]["train"]["num_iterations"] = 99
    write_config(smoke_run["dir"], cfg, "changed.yaml")
    out = snakemake(smoke_run["dir"], "-n", "results/smoke/token_shards.json", config="changed.yaml")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Nothing to be done" in out.stdout + out.stderr


def test_a_new_mirror_url_redoes_nothing(smoke_run):
    cfg = json.loads(json.dumps(smoke_run["cfg"]))
    cfg["datasets"]["webtext"]["base_url"] = (REPO / "tests" / "fixtures" / "webtext").as_uri()
    write_config(smoke_run["dir"], cfg, "mirror.yaml")
    out = snakemake(smoke_run["dir"], "-n", "results/smoke/token_shards.json", config="mirror.yaml")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Nothing to be done" in out.stdout + out.stderr


def test_bad_config_stops_snakemake_with_the_field_named(tmp_path):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["rows"]["d12"]["train"]["depth"] = 13
    write_config(tmp_path, cfg)
    out = snakemake(tmp_path, "-n")
    assert out.returncode != 0
    assert "rows.d12.train.depth: 13 is not a multiple of 2" in out.stdout + out.stderr


def test_dry_run_plans_every_seed_row_with_the_right_shards(tmp_path):
    rows = ["d24_jan29", "d26_fp8", "d26_fp8_1M", "d24_climbmix", "d12", "smoke"]
    write_config(tmp_path, yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    out = snakemake(tmp_path, "-n", "-p", *(f"results/{r}/token_shards.json" for r in rows))
    assert out.returncode == 0, out.stderr[-2000:]
    specs = [json.loads(m) for m in re.findall(r"pipeline\.download --spec '(\{.*?\})'", out.stdout)]
    shards = {}
    for spec in specs:
        shards.setdefault(spec["params"]["dataset"], []).extend(spec["params"]["shards"])
    assert sorted(shards["fineweb_edu"]) == list(range(370)) + [1822]
    assert sorted(shards["climbmix"]) == list(range(170)) + [6542]  # d12's 40 are among d24's 170
    assert sorted(shards["webtext"]) == [0, 1, 2, 6]
    assert len(re.findall(r"^rule tokenizer:", out.stdout, re.M)) == 3


@pytest.mark.fault
def test_a_run_killed_mid_stage_reruns_with_the_default_profile(tmp_path):
    """SIGKILL Snakemake and its job while the tokenizer runs; after --unlock, a plain rerun finishes
    (the default workflow profile carries rerun-incomplete)."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["datasets"]["webtext"]["base_url"] = str(REPO / "tests" / "fixtures" / "webtext")
    write_config(tmp_path, cfg)
    kill_snakemake_once(tmp_path, "results/smoke/token_shards.json",
                        lambda: list(tmp_path.glob("results/logs/tokenizer/*.log")), timeout=120)
    assert not (tmp_path / "results" / "smoke" / "token_shards.json").exists()
    rerun = snakemake(tmp_path, "results/smoke/token_shards.json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Using workflow specific profile" in rerun.stdout + rerun.stderr
    assert json.loads((tmp_path / "results" / "smoke" / "token_shards.json").read_text())["train_shards"] == 3


def test_dry_run_of_a_leaderboard_row_plans_the_whole_chain(tmp_path):
    write_config(tmp_path, yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    out = snakemake(tmp_path, "-n", "-p", "results/d26_fp8/core.json")
    assert out.returncode == 0, out.stderr[-2000:]
    rules = set(re.findall(r"^(?:local)?rule (\w+):", out.stdout, re.M))
    assert rules == {"download", "tokenizer", "pretokenize", "train", "bundle", "core", "publish_row"}
    train = next(line for line in out.stdout.splitlines() if "-m pipeline.train" in line)
    assert "OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=8 -m pipeline.train -- --run=d26-feb2-fp8" in \
        unlocked(train[train.index("OMP_NUM_THREADS"):])
    # the published launch line, flag for flag: its batch is the recipe's default, so no --total-batch-size
    assert "--depth=26 --device-batch-size=16 " in train and " --fp8 " in train and " --recipe=a67eba3 " in train
    assert "--total-batch-size" not in train


def test_snakemake_report_carries_the_leaderboard(smoke_run):
    out = snakemake(smoke_run["dir"], "--report", "report.html")
    assert out.returncode == 0, out.stderr[-2000:]
    page = (smoke_run["dir"] / "report.html").read_text(errors="replace")
    assert "leaderboard.md" in page and "core_per_row.png" in page


def test_a_row_with_seeds_trains_and_evaluates_once_per_seed(smoke_run):
    """Beside the smoke row, on its data: two seeds, each its own train and core key, one row on the page."""
    cfg = json.loads(json.dumps(smoke_run["cfg"]))
    cfg["rows"]["smoke_seeds"] = {**cfg["rows"]["smoke"], "seeds": [1, 2], "description": "smoke, two seeds",
                                  "train": {**cfg["rows"]["smoke"]["train"], "num_iterations": 10}}
    write_config(smoke_run["dir"], cfg, "seeds.yaml")
    work = smoke_run["dir"]
    out = snakemake(work, "results/smoke_seeds/train_summary.json", "results/smoke_seeds/core.json",
                    "reports/leaderboard.md", config="seeds.yaml")
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = re.findall(r"^(?:local)?rule (\w+):", out.stdout + out.stderr, re.M)
    assert jobs.count("train") == 2 and jobs.count("core") == 2
    assert not {"download", "tokenizer", "pretokenize"} & set(jobs)       # the smoke row's data, reused
    core = json.loads((work / "results" / "smoke_seeds" / "core.json").read_text())
    assert [r["seed"] for r in core["runs"]] == [1, 2]
    assert core["runs"][0]["core"]["core_metric"] != core["runs"][1]["core"]["core_metric"]   # really two models
    assert core["core_metric"] == pytest.approx(sum(r["core"]["core_metric"] for r in core["runs"]) / 2)
    summary = json.loads((work / "results" / "smoke_seeds" / "train_summary.json").read_text())
    assert [r["train_summary"]["step"] for r in summary["runs"]] == [10, 10]
    md = (work / "reports" / "leaderboard.md").read_text()   # drawn after the seeds' results, in the same run
    row = r"^\| smoke_seeds \| 0\.\d\d \| [0-9.]+ \| -?[0-9.]+ ± [0-9.]+ \(2 seeds\) \(partial"
    assert re.search(row, md, re.M), md
