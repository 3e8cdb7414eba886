"""The Snakefile end to end, in a scratch directory, with shards served over loopback HTTP."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import scipy.stats as scipy_stats
import yaml

from helpers import ENV, REPO, snakemake, snakemake_cmd, unlocked, write_config
from pipeline import config, store
from pipeline.core_tasks import GPT2_CORE

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
    # its test: the one-sided t-test over the two seeds that the mean CORE beats GPT-2's, as scipy computes it;
    # a capped CORE keeps the test but beats nothing
    values = [r["core"]["core_metric"] for r in core["runs"]]
    p = scipy_stats.ttest_1samp(values, GPT2_CORE, alternative="greater").pvalue
    assert core["significance"]["n"] == 2 and core["significance"]["p"] == pytest.approx(p)
    assert core["beats_gpt2"] is None and core["significance"]["significant"] is False
    line = [line for line in md.splitlines() if line.startswith("| smoke_seeds | ")][-1]   # the details table
    assert f"| {p:.4g} |" in line and "| not comparable (partial) |" in line


# ----------------------------------------------------------------------------- the report, as a user expects it

def jobs_planned(out):
    return set(re.findall(r"^(?:local)?rule (\w+):", out.stdout, re.M))


@pytest.mark.bad_input
def test_the_page_alone_never_trains_and_report_rows_makes_it_wait_for_named_rows(tmp_path):
    """Without report.rows the page is drawn from the rows that have results (here none) and plans nothing
    else; report.rows names rows the page waits for, which a run for the page then builds."""
    write_config(tmp_path, yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    alone = snakemake(tmp_path, "-n", "reports/leaderboard.md")
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert jobs_planned(alone) == {"run_config", "report"}
    named = snakemake(tmp_path, "-n", "reports/leaderboard.md", "--config", "report={rows: [d26_fp8]}")
    assert named.returncode == 0, named.stderr[-2000:]
    assert {"download", "tokenizer", "pretokenize", "train", "core", "publish_row", "train_summary",
            "report"} <= jobs_planned(named)
    bad = snakemake(tmp_path, "-n", "reports/leaderboard.md", "--config", "report={rows: [d26_fp9]}")
    assert bad.returncode != 0
    assert "report.rows names 'd26_fp9', not rows of the config" in bad.stdout + bad.stderr


@pytest.mark.bad_input
def test_a_config_override_reaches_the_page_and_jobs_run_only_this_checkouts_pipeline(tmp_path):
    """`--config` changes what the page shows (the report reads the config Snakemake holds, written to
    results/configs/<digest>.json); a job whose `python` lacks this checkout's pipeline stops with the fix."""
    cfg = write_config(tmp_path, yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    override = ("--config", 'rows={d12: {description: "d12, as this run overrides it"}}')
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system and subprocess.run([system, "-I", "-c", "import pipeline"], capture_output=True).returncode != 0:
        bin_dir = tmp_path / "other-python"
        bin_dir.mkdir()
        (bin_dir / "python").symlink_to(system)
        env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}"}
        wrong = subprocess.run(snakemake_cmd(tmp_path, "reports/leaderboard.md"), capture_output=True, text=True,
                               env=env, timeout=300)
        assert wrong.returncode != 0
        assert (f"this job's python ({bin_dir / 'python'}) does not import pipeline from {REPO}: run Snakemake "
                "from that checkout's environment (scripts/setup, then . .venv/bin/activate)") in wrong.stderr
    out = snakemake(tmp_path, "reports/leaderboard.md", *override)
    assert out.returncode == 0, out.stderr[-3000:]
    assert set(re.findall(r"^(?:local)?rule (\w+):", out.stdout + out.stderr, re.M)) == {"run_config", "report"}
    md = (tmp_path / "reports" / "leaderboard.md").read_text()
    assert "| d12 | not run | - | - | d12, as this run overrides it |" in md
    assert "d12, as this run overrides it" in (tmp_path / "reports" / "leaderboard.html").read_text()
    cfg["rows"]["d12"]["description"] = "d12, as this run overrides it"
    # the config the report read: the checked one Snakemake held, named by its digest
    newest = max((tmp_path / "results" / "configs").glob("*.json"), key=lambda f: f.stat().st_mtime)
    assert json.loads(newest.read_text()) == config.check(cfg)
    again = snakemake(tmp_path, "-n", "reports/leaderboard.md", *override)
    assert "Nothing to be done" in again.stdout + again.stderr


# ----------------------------------------------------------------------------- the workflow catalog's layout

def schema_fields(node, path=""):
    """Every property the config schema declares, as a dotted path (`rows.<name>.train.depth`)."""
    fields = []
    for name, sub in (node.get("properties") or {}).items():
        fields.append(f"{path}{name}")
        fields += schema_fields(sub, f"{path}{name}.")
    if isinstance(node.get("additionalProperties"), dict):
        fields += schema_fields(node["additionalProperties"], f"{path}<name>.")
    return fields


def test_config_readme_describes_every_field_of_the_schema():
    readme = (REPO / "config" / "README.md").read_text()
    fields = schema_fields(config.schema())
    assert "rows.<name>.train.depth" in fields and "report.gpu_hour_usd" in fields
    # each field is a row of its section's table: | `name` | ...
    sections = {}
    for section in re.split(r"^#+ ", readme, flags=re.M)[1:]:
        title, _, body = section.partition("\n")
        sections[title.strip().strip("`")] = set(re.findall(r"^\| `([a-z0-9_]+)` \|", body, re.M))
    missing = [f for f in fields if f.rpartition(".")[2] not in sections.get(f.rpartition(".")[0] or "Top level", ())]
    assert missing == [], f"config/README.md does not describe {missing} (add a row to its section's table)"


def test_the_workflow_catalog_finds_its_files():
    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    stack = catalog["usage"]["software-stack-deployment"]
    assert stack["conda"] is True and stack["report"] is True
    for env in ("environment.yaml", "environment-hf.yaml"):
        assert (REPO / "workflow" / "envs" / env).is_file()
    assert not (REPO / "envs").exists()
    # Snakemake looks for the default workflow profile in profiles/ beside the Snakefile: the link keeps it found
    assert (REPO / "profiles" / "default").resolve() == (REPO / "workflow" / "profiles" / "default").resolve()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        for env in re.findall(r'CONDA_ENV\w* = "([^"]+)"', smk.read_text()):
            assert (smk.parent / env).resolve().is_file(), (smk.name, env)


def test_the_rows_a_command_line_asks_for_whatever_way_it_writes_them(tmp_path):
    """The report waits for the rows and series the command names: relative, ./-prefixed or absolute paths
    inside the working directory; nothing outside it and nothing that is not a published file."""
    from pipeline.results import asked_for
    targets = ["results/a/core.json", "./results/b/train_summary.json", str(tmp_path / "results" / "c" / "core.json"),
               "results//d/core.json", "results/series/s/series.json", "reports/leaderboard.md", "all",
               "results/e/manifest.json", "../elsewhere/results/f/core.json", "results/imported/g/core.json"]
    assert asked_for("row", targets, str(tmp_path)) == {"a", "b", "c", "d"}
    assert asked_for("series", targets, str(tmp_path)) == {"s"}


def test_the_targets_the_report_reads_are_a_declared_field_of_snakemakes_workflow():
    """common.smk's requested() reads Workflow.dag_settings.targets: a declared field of Snakemake's
    Workflow, of its API's DAGSettings (so from 8.0 through 9.27). An upgrade that drops either fails here,
    in CI, before a page stops waiting for its rows."""
    import dataclasses

    import snakemake.api  # noqa: F401  (snakemake.workflow is imported through the API)
    from snakemake.settings.types import DAGSettings
    from snakemake.workflow import Workflow
    workflow = {f.name: f for f in dataclasses.fields(Workflow)}
    assert "dag_settings" in workflow and "DAGSettings" in str(workflow["dag_settings"].type)
    assert "targets" in {f.name for f in dataclasses.fields(DAGSettings)}


def test_reading_the_workflow_leaves_path_and_pythonpath_alone(tmp_path):
    """Jobs find `python` and `pipeline` through their environment (the activated venv, or conda's), never
    through an edit the Snakefile made to the Snakemake process: a dry run, in-process, changes neither."""
    write_config(tmp_path, yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    argv = snakemake_cmd(tmp_path, "-n", "--quiet")[3:]  # after `python -m snakemake`
    probe = ("import os, sys\n"
             "from snakemake.cli import main\n"
             "before = {k: os.environ.get(k) for k in ('PATH', 'PYTHONPATH')}\n"
             f"sys.argv = ['snakemake', *{argv!r}]\n"
             "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
             "print('unchanged' if before == {k: os.environ.get(k) for k in before} else 'changed')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "unchanged"


def test_ci_lints_the_workflow_as_the_catalog_does():
    """.ci/run (the README's test command) runs ruff, snakemake --lint and snakefmt --check before the tests."""
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    steps = ["ruff check .", "snakemake --lint", "snakefmt --check Snakefile workflow/rules", "pytest -q"]
    assert [lines.index(step) for step in steps] == sorted(lines.index(step) for step in steps)
