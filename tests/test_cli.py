import subprocess
import sys

import pytest

from helpers import REPO
from pipeline import config, plan


@pytest.mark.parametrize("stage", plan.STAGES)
def test_every_stage_runs_through_the_shared_command_line(stage, tmp_path):
    """Each stage takes the runner's flags, and a bad row is the runner's one line, whatever the stage."""
    out = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--help"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0 and out.stdout.startswith(f"usage: python -m pipeline.{stage} ")
    assert all(f"--{flag}" in out.stdout for flag in ("spec", "row", "config", "store", "work", "inputs", "out"))
    bad = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--row", "nope", "--store", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.startswith("error: config/config.yaml: no row named 'nope' (rows: ")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("tool", ["plan", "store", "publish", "report", "keylock", "launch"])
def test_the_bookkeeping_tools_have_a_command_line(tool):
    out = subprocess.run([sys.executable, "-m", f"pipeline.{tool}", "--help"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0 and out.stdout.startswith(f"usage: python -m pipeline.{tool} ")


def test_plan_show_lists_a_rows_keys():
    out = subprocess.run([sys.executable, "-m", "pipeline.plan", "show", "--row", "smoke"], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 0 and '"smoke"' in out.stdout and '"pretokenize"' in out.stdout


def test_a_bad_row_name_is_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline.tokenizer", "--row", "nope", "--store", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    rows = ", ".join(config.load(REPO / "config" / "config.yaml")["rows"])   # the series' members are rows too
    assert out.stderr.strip() == f"error: config/config.yaml: no row named 'nope' (rows: {rows})"
    assert rows.startswith("gpt2_xl, d24_jan29, d26_fp8") and rows.endswith(
        "d12, smoke, master_d12, master_d14, master_d16, master_d18, master_d20, master_d22, master_d24, master_d26, "
        "smoke_d2, smoke_d4, smoke_b_d2, smoke_b_d4")
