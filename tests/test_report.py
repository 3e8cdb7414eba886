import copy
import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import scipy.stats as scipy_stats
import yaml

from helpers import GIT, REPO, write_row
from pipeline import config, entry, provenance, report, store


@pytest.fixture
def built(tmp_path, repo_config):
    cfg = config.check(copy.deepcopy(repo_config))
    results, out = tmp_path / "results", tmp_path / "reports"
    write_row(results, "d24_jan29", core_metric=0.2590, partial=False, time_s=10800.0, depth=24, recipe="348fbb3")
    write_row(results, "d26_fp8", core_metric=0.2412, partial=True, time_s=9000.0, depth=26, gpus=4, recipe="92d63d4")
    reference = report.load_reference(REPO / "config" / "reference.yaml")
    report.build(cfg, reference, results, out, results / "store")
    return out, results


def table_rows(md):
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]


def test_markdown_has_published_rows_beside_reproduced_ones(built):
    out, _ = built
    md = (out / "leaderboard.md").read_text()
    rows = {r[0]: r for r in table_rows(md)}
    assert rows["1"][1:4] == ["3.04", "0.74833", "0.2585"]
    assert rows["1 (ours)"][1:4] == ["3.00", "0.74810", "0.2590"]
    assert rows["2 (ours)"][3] == "0.2412 (partial: 2 tasks)"
    assert rows["4 (ours)"][1] == "not run" and rows["d12"][1] == "not run"   # missing rows are listed
    # the Commit cell of a reproduction: the recipe it trained, and whether that is the published run's
    assert rows["1 (ours)"][6] == "recipe 348fbb3" and rows["4 (ours)"][6] == "recipe 324e69c"
    assert rows["2 (ours)"][6] == "recipe 92d63d4 (differs from the published a67eba3)"
    order = [r[0] for r in table_rows(md)]
    assert order.index("1 (ours)") == order.index("1") + 1


def details_rows(md):
    """The "Reproduced rows" table as {row: {column: cell}}."""
    header, *rows = table_rows(md.split("## Reproduced rows")[1].split("\n## ")[0])
    return {r[0]: dict(zip(header, r, strict=True)) for r in rows}


def test_details_say_who_beats_gpt2_and_what_it_cost(built):
    out, _ = built
    jan29 = details_rows((out / "leaderboard.md").read_text())["d24_jan29"]
    assert jan29["hardware"] == "NVIDIA H100 80GB HBM3 x 8" and jan29["total_training_time_s"] == "10800"
    assert jan29["total_training_time_h"] == "3.00" and jan29["seeds"] == "1"
    assert jan29["beats_gpt2"] == "above, one seed: no test possible" and jan29["core_p"] == "-"
    assert jan29["cost_usd"] == "72.00"          # 3 h x 8 GPUs x $3
    assert details_rows((out / "leaderboard.md").read_text())["d26_fp8"]["beats_gpt2"] == "not comparable (partial)"
    assert jan29["command"] == "`snakemake --cores all results/d24_jan29/core.json`"
    assert (jan29["recipe"], jan29["pipeline_commit"]) == ("recipe 348fbb3", "0123456")
    assert (jan29["tok_per_sec"], jan29["mfu_percent"]) == ("811,000", "48.5")      # how fast, and how it ran
    assert jan29["setup"] == "fp8 (2 layers), compiled, flash windows"
    assert report._setup({"device": "cuda:0", "compiled": True, "window_attention": "fa3"}) == \
        "bf16, compiled, FlashAttention-3"


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
    # val_bpb vs time and vs FLOPs, CORE per row, per task (a series adds its own: see test_series)
    assert page.count("data:image/png;base64,") == len(list((out / "figures").glob("*.png"))) == 4
    for png in (out / "figures").glob("*.png"):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png.name


def test_a_missing_reference_file_is_named(tmp_path):
    with pytest.raises(report.StageError, match="nope.yaml"):
        report.load_reference(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- seeds

@pytest.fixture
def seeded(tmp_path, repo_config):
    cfg = copy.deepcopy(repo_config)
    cfg["rows"]["d24_jan29"]["seeds"] = [1, 2, 3]
    cfg = config.check(cfg)
    results, out = tmp_path / "results", tmp_path / "reports"
    write_row(results, "d24_jan29", core_metric=0.2566, partial=False, time_s=10800.0, depth=24, seeds=[1, 2, 3])
    report.build(cfg, report.load_reference(REPO / "config" / "reference.yaml"), results, out, results / "store")
    return cfg, results, out


def test_a_row_with_seeds_gives_mean_spread_and_count_beating_gpt2(seeded):
    _, results, out = seeded
    core = json.loads((results / "d24_jan29" / "core.json").read_text())
    values = [0.2526, 0.2566, 0.2606]   # write_row spreads the seeds by 0.004 around 0.2566
    assert core["seeds"]["seeds"] == [1, 2, 3] and [r["seed"] for r in core["runs"]] == [1, 2, 3]
    assert core["core_metric"] == pytest.approx(0.2566)
    spread = core["seeds"]["core_metric"]
    assert (spread["min"], spread["max"]) == pytest.approx((values[0], values[2]))
    assert spread["std"] == pytest.approx(0.004) and spread["beating"] == 2    # 0.2566 and 0.2606 beat 0.256525
    assert core["tasks"]["arc_easy"]["centered"] == pytest.approx(0.46)       # the per-task mean
    summary = json.loads((results / "d24_jan29" / "train_summary.json").read_text())
    assert summary["total_training_time"] == pytest.approx(10860.0)             # mean of 10800, 10860, 10920
    md = (out / "leaderboard.md").read_text()
    assert {r[0]: r for r in table_rows(md)}["1 (ours)"][3] == "0.2566 ± 0.0040 (3 seeds, 2 beat GPT-2)"
    row = details_rows(md)["d24_jan29"]
    # a mean 0.000075 above the bar with a spread of 0.004: far from significant
    p = scipy_stats.ttest_1samp(values, 0.256525, alternative="greater").pvalue
    assert core["significance"]["p"] == pytest.approx(p) and core["beats_gpt2"] is False
    assert row["seeds"] == "3" and row["beats_gpt2"] == f"no (p = {p:.4f}, not < 0.01; 2 of 3 seeds beat it)"
    assert (row["tok_per_sec"], row["mfu_percent"]) == ("812,000", "49.5")          # means over the seeds
    assert len(row["train_key"].split()) == 3


@pytest.mark.parametrize(("alpha", "verdict"), [(None, "yes (p = {p:.4f} < 0.01; 3 of 3 seeds beat it)"),
                                                 (0.001, "no (p = {p:.4f}, not < 0.001; 3 of 3 seeds beat it)")])
def test_seeds_beat_gpt2_only_below_the_threshold_which_the_config_sets(tmp_path, repo_config, alpha, verdict):
    cfg = copy.deepcopy(repo_config)
    cfg["rows"]["d24_jan29"]["seeds"] = [1, 2, 3]
    if alpha is not None:
        cfg["report"]["alpha"] = alpha
    results, out = tmp_path / "results", tmp_path / "reports"
    write_row(results, "d24_jan29", core_metric=0.28, partial=False, time_s=10800.0, depth=24, seeds=[1, 2, 3])
    report.build(config.check(cfg), report.load_reference(REPO / "config" / "reference.yaml"), results, out,
                 results / "store")
    p = scipy_stats.ttest_1samp([0.276, 0.28, 0.284], 0.256525, alternative="greater").pvalue
    assert 0.001 < p < 0.01
    row = details_rows((out / "leaderboard.md").read_text())["d24_jan29"]
    assert row["beats_gpt2"] == verdict.format(p=p) and float(row["core_p"]) == pytest.approx(p, abs=1e-4)
    # and its time against the record's (10800-10920 s against run 6's 1.65 h: surely not faster)
    record_time = entry.record(report.load_reference(REPO / "config" / "reference.yaml"))[1]
    time_p = scipy_stats.ttest_1samp([10800, 10860, 10920], record_time, alternative="less").pvalue
    assert float(row["time_p"]) == pytest.approx(time_p, abs=1e-4) and time_p > 0.99


@pytest.mark.bad_input
def test_seeds_and_train_seed_together_are_refused(repo_config):
    cfg = copy.deepcopy(repo_config)
    cfg["rows"]["d12"]["seeds"] = [1, 2]
    cfg["rows"]["d12"]["train"]["seed"] = 7
    with pytest.raises(config.ConfigError, match=r"rows\.d12\.seeds: the row also sets train\.seed"):
        config.check(cfg)


# ----------------------------------------------------------------------------- refusing what does not verify

def rebuild(cfg, results, out):
    return {r["row"]: r for r in report.build(cfg, report.load_reference(REPO / "config" / "reference.yaml"),
                                              results, out, results / "store")}


@pytest.mark.fault
def test_a_published_number_edited_by_hand_is_refused(built, repo_config):
    out, results = built
    path = results / "d24_jan29" / "core.json"
    path.write_text(path.read_text().replace("0.259", "0.299", 1))
    rows = rebuild(config.check(copy.deepcopy(repo_config)), results, out)
    assert rows["d24_jan29"]["status"] == "refused" and rows["d26_fp8"]["status"] == "reproduced"
    md = (out / "leaderboard.md").read_text()
    assert f"- `d24_jan29`: {path}: sha256 differs" in md and "0.299" not in md
    assert {r[0]: r for r in table_rows(md)}["1 (ours)"][1:4] == ["refused", "-", "-"]
    assert "d24_jan29" not in details_rows(md)


@pytest.mark.fault
def test_a_store_file_edited_after_publication_is_refused(built, repo_config):
    out, results = built
    (core_dir,) = [d for d in (results / "store" / "core").iterdir()
                   if json.loads((d / "manifest.json").read_text())["key"] in
                   (results / "d26_fp8" / "manifest.json").read_text()]
    (core_dir / "core.json").write_text((core_dir / "core.json").read_text() + " ")
    rows = rebuild(config.check(copy.deepcopy(repo_config)), results, out)
    assert rows["d26_fp8"]["status"] == "refused"
    size = len((core_dir / "core.json").read_bytes())
    assert rows["d26_fp8"]["problems"] == [f"{core_dir / 'core.json'}: size {size} != {size - 1} in manifest"]


@pytest.mark.fault
def test_a_seeds_mean_edited_by_hand_is_refused(seeded):
    cfg, results, out = seeded
    path = results / "d24_jan29" / "core.json"
    core = json.loads(path.read_text())
    core["seeds"]["core_metric"]["beating"] = 3
    store.write_json(path, core)
    rows = rebuild(cfg, results, out)
    assert rows["d24_jan29"]["problems"] == [f"{path}: its mean and spread do not recompute from its seeds' files "
                                             "(edited by hand?)"]


# ----------------------------------------------------------------------------- import

def local_config(tmp_path, repo_config):
    """The repo's config with its store under tmp_path; returns (checked config, its path)."""
    cfg = copy.deepcopy(repo_config)
    cfg["store_dir"] = str(tmp_path / "results" / "store")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return config.check(cfg), tmp_path / "config.yaml"


def remote_results(tmp_path):
    """A results directory as a cluster leaves it: two rows and their store."""
    remote = tmp_path / "cluster" / "results"
    write_row(remote, "d24_jan29", core_metric=0.2590, partial=False, time_s=10800.0, depth=24)
    write_row(remote, "d26_fp8", core_metric=0.2612, partial=False, time_s=9000.0, depth=26)
    return remote


def test_import_brings_verified_rows_into_the_report(tmp_path, repo_config, capsys):
    cfg, path = local_config(tmp_path, repo_config)
    remote, results = remote_results(tmp_path), tmp_path / "results"
    assert report.main(["import", str(remote), "--results", str(results), "--config", str(path)]) == 0
    assert sorted(p.name for p in (results / "imported").iterdir()) == ["d24_jan29", "d26_fp8"]
    assert "imported d26_fp8: made by another config or code" in capsys.readouterr().err
    for d in (remote / "store").glob("*/*"):   # the chains' store directories came along, whole
        assert store.verify(Path(cfg["store_dir"]) / d.parent.name / d.name) == []
    rows = rebuild(cfg, results, tmp_path / "reports")
    assert rows["d26_fp8"]["status"] == "reproduced" and rows["d26_fp8"]["imported"]
    assert details_rows((tmp_path / "reports" / "leaderboard.md").read_text())["d26_fp8 (imported)"]["core_metric"] \
        == "0.2612"
    assert report.main(["import", str(remote), "--results", str(results), "--config", str(path)]) == 0  # again


@pytest.mark.fault
@pytest.mark.parametrize("damage", ["edited", "missing", "row-file"])
def test_import_refuses_a_tampered_or_partial_directory_and_copies_nothing(tmp_path, damage, capsys, repo_config):
    _, path = local_config(tmp_path, repo_config)
    remote, results = remote_results(tmp_path), tmp_path / "results"
    (train_dir,) = [d for d in (remote / "store" / "train").iterdir()
                    if d.name in (remote / "d26_fp8" / "manifest.json").read_text()]
    if damage == "edited":
        victim = train_dir / "metrics.jsonl"
        victim.write_text(victim.read_text().replace("0.9", "0.8"))
    elif damage == "missing":
        victim = train_dir / "train_summary.json"
        victim.unlink()
    else:
        victim = remote / "d26_fp8" / "train_summary.json"
        victim.write_text(victim.read_text().replace("9000", "900"))
    assert report.main(["import", str(remote), "--results", str(results), "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"refusing to import {remote}; nothing was copied" in err and str(victim) in err
    assert not (results / "imported").exists() and not (tmp_path / "results" / "store").exists()


@pytest.mark.fault
def test_import_never_overwrites_a_different_row(tmp_path):
    remote, results = remote_results(tmp_path), tmp_path / "results"
    provenance.import_results(remote, results / "imported", results / "store")
    other = tmp_path / "other"
    write_row(other, "d26_fp8", core_metric=0.2500, partial=False, time_s=9000.0, depth=26)
    with pytest.raises(report.StageError, match=r"imported/d26_fp8/core.json: already imported and different"):
        provenance.import_results(other, results / "imported", results / "store")
    assert json.loads((results / "imported" / "d26_fp8" / "core.json").read_text())["core_metric"] == 0.2612


@pytest.mark.bad_input
def test_import_of_a_directory_without_rows_says_what_a_row_is(tmp_path):
    with pytest.raises(report.StageError, match="no row to import"):
        provenance.import_results(tmp_path, tmp_path / "imported", tmp_path / "store")


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs Debian's chromium (scripts/system-deps installs it)")
def test_the_page_renders_in_headless_chromium(built, tmp_path):
    out, _ = built
    shot = tmp_path / "page.png"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "report_screenshot.py"), str(out / "leaderboard.html"),
                           "--out", str(shot), "--height", "1600"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1280)
    ink = (pixels.min(axis=2) < 0.9).mean()   # text, table rules and figures, not an empty white page
    blue = ((pixels[..., 2] - pixels[..., 0]) > 0.3).mean()   # the figures' colours came through
    assert ink > 0.03 and blue > 0.001, (ink, blue)


# ----------------------------------------------------------------------------- the leaderboard entry

def test_the_entry_is_what_a_leaderboard_pr_needs(tmp_path, repo_config, capsys):
    cfg = copy.deepcopy(repo_config)
    results = tmp_path / "results"
    cfg["store_dir"] = str(results / "store")
    cfg["rows"]["d24_jan29"]["seeds"] = [1, 2, 3]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    write_row(results, "d24_jan29", core_metric=0.28, partial=False, time_s=5000.0, depth=24, seeds=[1, 2, 3],
              recipe="348fbb3")
    write_row(results, "d26_fp8", core_metric=0.27, partial=False, time_s=9000.0, depth=26)
    args = ["entry", "--config", str(tmp_path / "config.yaml"), "--results", str(results), "--reference",
            str(REPO / "config" / "reference.yaml"), "--row"]
    assert report.main([*args, "d24_jan29", "--contributors", "@me"]) == 0
    text = capsys.readouterr().out
    reference = report.load_reference(REPO / "config" / "reference.yaml")
    number, record_time = entry.record(reference)
    assert number == min((r for r in reference["rows"] if r["number"]), key=lambda r: r["time_hours"])["number"]
    assert ("| 7 | 1.41 | 0.74810 | 0.2800 | d24 baseline, slightly overtrained | 2026-12-01 | 348fbb3 | @me |"
            in text.splitlines())   # the mean over the seeds: 5060 s; the next number after the board's 0-6
    # nanochat's flags only: no --seed (base_train has none; the seeds are listed below) and no --recipe
    launch = "OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=24"
    assert f"    {launch}\n" in text
    assert "    snakemake --cores all results/d24_jan29/core.json" in text
    assert "recipe commit: 348fbb3" in text and f"pipeline commit: {GIT['commit']}" in text
    assert "    total_training_time: 5060.0" in text and "    step: 16704" in text and "seeds: 1, 2, 3" in text
    core_p = scipy_stats.ttest_1samp([0.276, 0.28, 0.284], 0.256525, alternative="greater").pvalue
    time_p = scipy_stats.ttest_1samp([5000, 5060, 5120], record_time, alternative="less").pvalue
    assert f"CORE > GPT-2's 0.256525: p = {core_p:.4g} over 3 seeds (passes p < 0.01;" in text
    assert f"time < record (#{number}, {record_time:.0f} s): p = {time_p:.4g} over 3 seeds (passes p < 0.01;" in text
    assert report.main([*args, "d26_fp8"]) == 0
    assert "CORE > GPT-2's 0.256525: one seed: no test is possible" in capsys.readouterr().out
    assert report.main([*args, "d12"]) == 2
    assert "row d12: no entry, it not run (build it with `snakemake --cores all results/d12/core.json`)" in \
        capsys.readouterr().err
