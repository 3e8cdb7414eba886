import subprocess
import sys

import pytest
import yaml

from conftest import REPO


@pytest.mark.parametrize("module", ["download", "tokenizer", "pretokenize", "plan", "store", "publish"])
def test_every_stage_has_a_cli(module):
    out = subprocess.run([sys.executable, "-m", f"pipeline.{module}", "--help"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0
    assert out.stdout.startswith("usage: python -m pipeline.")


def test_plan_show_lists_a_rows_keys():
    out = subprocess.run([sys.executable, "-m", "pipeline.plan", "show", "--row", "smoke"], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 0 and '"smoke"' in out.stdout and '"pretokenize"' in out.stdout


def test_a_bad_row_name_is_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline.tokenizer", "--row", "nope", "--store", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    rows = ", ".join(yaml.safe_load((REPO / "config" / "config.yaml").read_text())["rows"])
    assert out.stderr.strip() == f"error: config/config.yaml: no row named 'nope' (rows: {rows})"
    assert rows.startswith("gpt2_xl, d24_jan29, d26_fp8") and rows.endswith("d12, smoke")
