import copy
import csv
import json
import re

import pytest

from conftest import REPO
from pipeline import config, report


def write_row(results, name, *, core_metric, partial, time_s, depth, gpus=8, device="NVIDIA H100 80GB HBM3"):
    d = results / name
    d.mkdir(parents=True)
    tasks = {"arc_easy": {"centered": 0.45, "accuracy": 0.59, "items": 2376, "correct": 1400, "type": "mc",
                          "num_fewshot": 10, "random_baseline": 25.0},
             "piqa": {"centered": 0.42, "accuracy": 0.71, "items": 1838, "correct": 1300, "type": "mc",
                      "num_fewshot": 10, "random_baseline": 50.0}}
    (d / "core.json").write_text(json.dumps({
        "core_metric": core_metric, "partial": partial, "tasks_evaluated": 2 if partial else 22, "tasks": tasks,
        "max_per_task": -1, "comparable_to_gpt2": not partial,
        "beats_gpt2": None if partial else core_metric > 0.256525}))
    (d / "train_summary.json").write_text(json.dumps({
        "total_training_time": time_s, "total_training_flops": 4.33e19 * depth / 24, "step": 16704,
        "min_val_bpb": 0.7481, "val_bpb": 0.7483, "world_size": gpus, "device": device}))
    steps = (1, 8000, 16704)
    metrics = [{"step": s, "loss": 3.0 - s / 10000, "total_training_time": time_s * s / 16704} for s in steps]
    metrics += [{"step": s, "val_bpb": 0.9 - s / 100000} for s in (0, 8000, 16704)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (d / "manifest.json").write_text(json.dumps({
        "row": name, "command": f"snakemake --cores all results/{name}/core.json",
        "chain": {"train": {"key": "a" * 16, "git": {"commit": "0123456789abcdef" * 2 + "01234567", "dirty": False},
                            "params": {"depth": depth},
                            "resolved": {"flops_per_token": 4.9451e9, "total_batch_size": 524288}},
                  "core": {"key": "b" * 16, "finished_at": "2026-12-01T10:00:00+00:00"}}}))


@pytest.fixture
def built(tmp_path, repo_config):
    cfg = config.check(copy.deepcopy(repo_config))
    results, out = tmp_path / "results", tmp_path / "reports"
    write_row(results, "d24_jan29", core_metric=0.2590, partial=False, time_s=10800.0, depth=24)
    write_row(results, "d26_fp8", core_metric=0.2412, partial=True, time_s=9000.0, depth=26, gpus=4)
    reference = report.load_reference(REPO / "config" / "reference.yaml")
    report.build(cfg, reference, results, out)
    return out, results


def table_rows(md):
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]


def test_markdown_has_published_rows_beside_reproduced_ones(built):
    out, _ = built
    md = (out / "leaderboard.md").read_text()
    rows = {r[0]: r for r in table_rows(md)}
    assert rows["1"][1:4] == ["3.04", "0.74833", "0.2585"]
    assert rows["1 (ours)"][1:4] == ["3.00", "0.74810", "0.2590"] and rows["1 (ours)"][6] == "0123456"
    assert rows["2 (ours)"][3] == "0.2412 (partial: 2 tasks)"
    assert rows["4 (ours)"][1] == "not run" and rows["d12"][1] == "not run"   # missing rows are listed
    order = [r[0] for r in table_rows(md)]
    assert order.index("1 (ours)") == order.index("1") + 1


def test_details_say_who_beats_gpt2_and_what_it_cost(built):
    out, _ = built
    rows = {r[0]: r for r in table_rows((out / "leaderboard.md").read_text())}
    jan29 = rows["d24_jan29"]
    assert jan29[3] == "NVIDIA H100 80GB HBM3 x 8" and jan29[4] == "10800" and jan29[5] == "3.00"
    assert jan29[9] == "yes" and jan29[10] == "72.00"          # 3 h x 8 GPUs x $3
    assert rows["d26_fp8"][9] == "not comparable (partial)"    # never counted as beating GPT-2
    assert "`snakemake --cores all results/d24_jan29/core.json`" in jan29[11]


def test_csv_matches_the_json_inputs(built):
    out, results = built
    with open(out / "leaderboard.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "reproduced"]
    for r in rows:
        summary = json.loads((results / r["row"] / "train_summary.json").read_text())
        core = json.loads((results / r["row"] / "core.json").read_text())
        assert float(r["total_training_time_s"]) == summary["total_training_time"]
        assert float(r["total_training_flops"]) == pytest.approx(summary["total_training_flops"])
        assert float(r["core_metric"]) == core["core_metric"]
    assert {r["row"] for r in rows} == {"d24_jan29", "d26_fp8"}


def test_html_is_self_contained_and_figures_are_real_pngs(built):
    out, _ = built
    page = (out / "leaderboard.html").read_text()
    assert not re.search(r"(src|href)=['\"]?https?://", page)
    assert page.count("data:image/png;base64,") == len(list((out / "figures").glob("*.png"))) == 5  # + scaling
    for png in (out / "figures").glob("*.png"):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png.name


def test_a_missing_reference_file_is_named(tmp_path):
    with pytest.raises(report.StageError, match="nope.yaml"):
        report.load_reference(tmp_path / "nope.yaml")
