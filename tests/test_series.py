"""Miniseries and A/B across depths (config series:, pipeline.series, the page's series section): members
as ordinary rows, the power-law fits and GPT-2 crossing checked against numpy, the per-depth Welch tests
against scipy, and the smoke miniseries built end to end by the README's command."""

import copy
import json
import math
import re
import shutil
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import scipy.stats as scipy_stats

from helpers import REPO, ShardServer, snakemake, write_config, write_row
from pipeline import config, plan, report, series
from pipeline.core_tasks import GPT2_CORE

REFERENCE = REPO / "config" / "reference.yaml"


def with_series(repo_config, **fields):
    cfg = copy.deepcopy(repo_config)
    cfg["series"] = {"sweep": {"row": "d24_mar14", "depths": [12, 16, 20], **fields}}
    return config.check(cfg)


# ----------------------------------------------------------------------------- members are ordinary rows

def test_a_series_is_rows_that_share_keys_with_the_rows_they_equal(repo_config):
    cfg = config.check(repo_config)
    rows, keys = cfg["rows"], plan.make_plan(cfg).rows
    assert [n for n in rows if n.startswith("smoke_")] == ["smoke_d2", "smoke_d4", "smoke_b_d2", "smoke_b_d4"]
    # the member at the row's own depth is the row: the same store keys, trained once
    assert keys["master_d24"]["train"] == keys["d24_master"]["train"]
    assert keys["master_d24"]["core"] == keys["d24_master"]["core"]
    # the smoke series has seeds of its own: one training per seed and member, none the smoke row's
    trains = [k for n in ("smoke_d2", "smoke_d4", "smoke_b_d2", "smoke_b_d4") for k in keys[n]["train"]]
    assert len(set(trains)) == 8 and keys["smoke"]["train"][0] not in trains
    d4, b4 = rows["smoke_d4"], rows["smoke_b_d4"]
    assert d4["train"]["depth"] == 4 and d4["train"]["run"] == d4["train"]["model_tag"] == "smoke_d4"
    assert b4["train"]["matrix_lr"] == 0.04 and "matrix_lr" not in d4["train"]
    assert d4["series_member"] == {"series": "smoke", "arm": "a", "depth": 4}
    assert rows["master_d12"]["train"]["target_param_data_ratio"] == 8 and "reference" not in rows["master_d12"]
    assert rows["master_d12"]["recipe"] == rows["d24_master"]["recipe"]
    # checking the checked config (what the report job does) gives it back, members included
    assert config.check(cfg) == cfg
    # adding a series re-keys nothing that was there
    bare = copy.deepcopy(repo_config)
    bare["series"] = {}
    before = plan.make_plan(config.check(bare)).rows
    assert all(keys[name] == before[name] for name in before)


def test_series_seeds_and_b_changes_reach_every_member(repo_config):
    cfg = with_series(repo_config, seeds=[1, 2], b={"recipe": "6ed7d1d", "knobs": {"softcap": 20}})
    for depth in (12, 16, 20):
        a, b = cfg["rows"][f"sweep_d{depth}"], cfg["rows"][f"sweep_b_d{depth}"]
        assert a["seeds"] == b["seeds"] == [1, 2] and a["recipe"] == "a825e63"
        assert b["recipe"] == "6ed7d1d" and b["knobs"] == {"softcap": 20} and b["train"]["depth"] == depth
    keys = plan.make_plan(cfg).rows
    assert len(keys["sweep_b_d12"]["train"]) == 2 and keys["sweep_b_d12"]["train"] != keys["sweep_d12"]["train"]
    assert config.arm_label(cfg["series"]["sweep"], "b") == "d24_mar14 + recipe 6ed7d1d, softcap=20"


@pytest.mark.bad_input
@pytest.mark.parametrize(("fields", "where", "what"), [
    ({"row": "nope"}, "series.sweep.row", "'nope' is not a row; name a trained row of rows:"),
    ({"row": "gpt2_xl"}, "series.sweep.row", "a published model, which has no depth"),
    ({"depths": [12]}, "series.sweep.depths", "is too short"),
    ({"depths": [12, 13]}, "series.sweep.depths.1", "not a multiple of 2"),
    ({"b": {"train": {"depth": 4}}}, "series.sweep.b.train", "the series sets depth, run and model_tag"),
    ({"b": {"knobs": {"softcapp": 20}}}, "series.sweep (its member sweep_b_d12: arm b at d12)",
     "knobs.softcapp: unknown knob"),
    ({"b": {"train": {"total_batch_size": 1000}}}, "series.sweep (its member sweep_b_d16: arm b at d16)",
     "train.total_batch_size: 1000 tokens is not a multiple"),
    ({"depths": [24, 26]}, "series.sweep", "its member row 'sweep_d24' (arm a, d24) is already a row"),
])
def test_a_bad_series_is_refused_naming_its_field(repo_config, fields, where, what):
    cfg = copy.deepcopy(repo_config)
    cfg["rows"]["sweep_d24"] = copy.deepcopy(cfg["rows"]["d12"])
    cfg["series"] = {"sweep": {"row": "d24_mar14", "depths": [12, 16, 20], **fields}}
    with pytest.raises(config.ConfigError) as e:
        config.check(cfg)
    line = next((line for line in str(e.value).splitlines() if line.strip().startswith(where + ":")), str(e.value))
    assert what in line, str(e.value)


@pytest.mark.bad_input
def test_a_row_marked_as_a_member_by_hand_is_refused(repo_config):
    cfg = copy.deepcopy(repo_config)
    cfg["rows"]["mine"] = {**cfg["rows"]["d12"], "series_member": {"series": "smoke", "arm": "a", "depth": 12}}
    with pytest.raises(config.ConfigError, match=r"rows\.mine\.series_member: set by the config check"):
        config.check(cfg)


# ----------------------------------------------------------------------------- the numbers

F24 = 4.33e19  # write_row's training FLOPs at d24; they scale with depth
F_STAR = F24 * 26 / 24  # where the made-up CORE reaches GPT-2's: d26


def sweep_rows(results, arm="a", seeds=None, bpb_shift=(0.0, 0.0, 0.0), core_noise=(0.0, 0.0, 0.0)):
    """Made-up members on exact power laws: CORE = GPT-2's at F_STAR (exponent 0.25), val_bpb ~ C^-0.03,
    time ~ C^1.1; `bpb_shift` moves arm B's val_bpb per depth, `core_noise` its CORE."""
    for i, depth in enumerate((12, 16, 20)):
        flops = F24 * depth / 24
        name = f"sweep_d{depth}" if arm == "a" else f"sweep_b_d{depth}"
        write_row(results, name, depth=depth, partial=False, seeds=seeds, spread=(0.003, 30.0, 0.002),
                  core_metric=GPT2_CORE * (flops / F_STAR) ** 0.25 + core_noise[i],
                  val_bpb=0.9 * (flops / 1e18) ** -0.03 + bpb_shift[i], time_s=3600 * (flops / 1e19) ** 1.1)


def test_fits_and_the_gpt2_crossing_are_numpys_log_log_lines(tmp_path, repo_config):
    cfg = with_series(repo_config, seeds=[1])
    results = tmp_path / "results"
    sweep_rows(results)
    doc = series.build(cfg, "sweep", results, results / "store")
    arm = doc["arms"]["a"]
    assert [p["depth"] for p in arm["members"]] == [12, 16, 20] and arm["label"] == "d24_mar14"
    flops = np.array([p["total_training_flops"] for p in arm["members"]])
    for name, ys in (("val_bpb_vs_flops", [p["val_bpb"] for p in arm["members"]]),
                     ("core_vs_flops", [p["core_metric"] for p in arm["members"]]),
                     ("time_vs_flops", [p["total_training_time"] for p in arm["members"]])):
        slope, intercept = np.polyfit(np.log10(flops), np.log10(ys), 1)
        fit = arm["fits"][name]
        assert fit["b"] == pytest.approx(slope) and math.log10(fit["a"]) == pytest.approx(intercept), name
    assert arm["fits"]["core_vs_flops"]["b"] == pytest.approx(0.25)
    crossing = arm["gpt2_crossing"]
    assert crossing["flops"] == pytest.approx(F_STAR) and crossing["depth"] == pytest.approx(26.0)
    assert crossing["total_training_time"] == pytest.approx(3600 * (F_STAR / 1e19) ** 1.1)
    assert crossing["extrapolated"] is True and crossing["comparable"] is True
    assert arm["members"][0]["params"] == 1_384_124_976 * 12 // 24
    assert arm["members"][0]["param_data_ratio"] == pytest.approx(16704 * 524288 / (729_813_504 * 12 // 24))


def test_a_noisy_core_crosses_where_numpys_fit_does(tmp_path, repo_config):
    cfg = with_series(repo_config, seeds=[1])
    results = tmp_path / "results"
    sweep_rows(results, core_noise=(0.004, -0.006, 0.003))
    arm = series.build(cfg, "sweep", results, results / "store")["arms"]["a"]
    xs = [p["total_training_flops"] for p in arm["members"]]
    slope, intercept = np.polyfit(np.log10(xs), np.log10([p["core_metric"] for p in arm["members"]]), 1)
    assert arm["gpt2_crossing"]["flops"] == pytest.approx(10 ** ((math.log10(GPT2_CORE) - intercept) / slope))
    r2 = np.corrcoef(np.log10(xs), np.log10([p["core_metric"] for p in arm["members"]]))[0, 1] ** 2
    assert arm["fits"]["core_vs_flops"]["r2"] == pytest.approx(r2)


def test_no_crossing_when_core_is_not_positive_or_does_not_grow(tmp_path, repo_config):
    cfg = with_series(repo_config, seeds=[1])
    results = tmp_path / "results"
    for depth, core in ((12, -0.01), (16, 0.05), (20, 0.08)):
        write_row(results, f"sweep_d{depth}", depth=depth, partial=True, core_metric=core, time_s=100.0 * depth)
    arm = series.build(cfg, "sweep", results, results / "store")["arms"]["a"]
    assert arm["fits"]["core_vs_flops"]["why"].startswith("CORE is not positive at every depth")
    assert arm["gpt2_crossing"] == {"why": "CORE has no power-law fit to cross with"}
    assert "why" not in arm["fits"]["val_bpb_vs_flops"]   # val_bpb is flat here, which a power law fits
    for depth, core in ((12, 0.12), (16, 0.11), (20, 0.10)):
        write_row(results, f"sweep_d{depth}", depth=depth, partial=False, core_metric=core, time_s=100.0 * depth)
    arm = series.build(cfg, "sweep", results, results / "store")["arms"]["a"]
    assert "does not grow with FLOPs" in arm["gpt2_crossing"]["why"]


def test_ab_per_depth_is_scipys_welch_test_and_one_verdict(tmp_path, repo_config):
    cfg = with_series(repo_config, seeds=[1, 2, 3], b={"label": "lower lr", "train": {"matrix_lr": 0.01}})
    results = tmp_path / "results"
    sweep_rows(results, seeds=[1, 2, 3])
    sweep_rows(results, "b", seeds=[1, 2, 3], bpb_shift=(-0.01, -0.012, 0.001))
    doc = series.build(cfg, "sweep", results, results / "store")
    ab = doc["ab"]
    for d in ab["per_depth"]:
        a = [p for p in doc["arms"]["a"]["members"] if p["depth"] == d["depth"]][0]
        b = [p for p in doc["arms"]["b"]["members"] if p["depth"] == d["depth"]][0]
        p = scipy_stats.ttest_ind(b["val_bpb_values"], a["val_bpb_values"], equal_var=False, alternative="less").pvalue
        assert d["val_bpb"]["p"] == pytest.approx(p) and d["val_bpb"]["better"] == (p < 0.01)
        assert d["val_bpb"]["diff"] == pytest.approx(b["val_bpb"] - a["val_bpb"])
        assert d["val_bpb"]["spread"] == pytest.approx(math.sqrt(np.var(a["val_bpb_values"], ddof=1) / 3
                                                                 + np.var(b["val_bpb_values"], ddof=1) / 3))
    assert [d["val_bpb"]["better"] for d in ab["per_depth"]] == [True, True, False]
    assert ab["verdict"] == ("lower lr vs d24_mar14: better at some depths (d12, d16 of 3) on val_bpb, better at no "
                             "depth on CORE (Welch's one-sided t-test over seeds at p < 0.01)")


def test_ab_with_one_seed_goes_by_the_sign_and_says_so(tmp_path, repo_config):
    cfg = with_series(repo_config, b={"train": {"matrix_lr": 0.01}}, seeds=[7])
    results = tmp_path / "results"
    sweep_rows(results)
    sweep_rows(results, "b", bpb_shift=(-0.001, -0.002, -0.003), core_noise=(0.001, 0.002, 0.003))
    ab = series.build(cfg, "sweep", results, results / "store")["ab"]
    assert all(d["val_bpb"]["p"] is None and d["val_bpb"]["spread"] is None for d in ab["per_depth"])
    assert ab["verdict"] == ("d24_mar14 + matrix_lr=0.01 vs d24_mar14: better at every depth (d12, d16, d20) on "
                             "val_bpb, better at every depth (d12, d16, d20) on CORE (the sign of the difference: one "
                             "seed per member, no test possible)")


@pytest.mark.bad_input
def test_a_series_with_a_member_missing_or_edited_names_it(tmp_path, repo_config, capsys):
    cfg = with_series(repo_config, seeds=[1])
    results = tmp_path / "results"
    sweep_rows(results)
    shutil.rmtree(results / "sweep_d16")
    core = json.loads((results / "sweep_d20" / "core.json").read_text())
    (results / "sweep_d20" / "core.json").write_text(json.dumps({**core, "core_metric": 0.3}))
    with pytest.raises(series.StageError, match=r"series sweep: members without verified results: sweep_d16 "
                                                r"\(not run\), sweep_d20 \(refused\); build them with `snakemake"):
        series.build(cfg, "sweep", results, results / "store")
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps({**cfg, "store_dir": str(results / "store")}))
    assert series.main(["build", "--name", "sweep", "--config", str(cfg_file), "--results", str(results),
                        "--out", str(tmp_path / "series.json")]) == 2
    assert "sweep_d16 (not run)" in capsys.readouterr().err and not (tmp_path / "series.json").exists()
    assert series.main(["build", "--name", "other", "--config", str(cfg_file), "--results", str(results),
                        "--out", str(tmp_path / "series.json")]) == 2
    assert "no series named 'other' in the config (series: sweep)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- on the page

@pytest.fixture
def page(tmp_path, repo_config):
    cfg = with_series(repo_config, seeds=[1, 2, 3], b={"label": "lower lr", "train": {"matrix_lr": 0.01}})
    results, out = tmp_path / "results", tmp_path / "reports"
    write_row(results, "d24_jan29", core_metric=0.2590, partial=False, time_s=10800.0, depth=24, recipe="348fbb3")
    sweep_rows(results, seeds=[1, 2, 3])
    sweep_rows(results, "b", seeds=[1, 2, 3], bpb_shift=(-0.01, -0.012, 0.001))
    report.build(cfg, report.load_reference(REFERENCE), results, out, results / "store")
    return cfg, results, out


def test_the_page_shows_the_series_its_fits_crossing_and_verdict(page):
    cfg, results, out = page
    md = (out / "leaderboard.md").read_text()
    doc = series.build(cfg, "sweep", results, results / "store")
    section = md[md.index("## Miniseries sweep"):]
    assert section.startswith("## Miniseries sweep (depths 12, 16, 20; A: d24_mar14 vs B: lower lr)")
    assert f"**Verdict:** {doc['ab']['verdict']}" in section
    fit = doc["arms"]["a"]["fits"]["core_vs_flops"]
    assert f"CORE = {fit['a']:.4g} · C^{fit['b']:.4f} (r² {fit['r2']:.4f})" in section
    assert f"CORE's fit reaches GPT-2's 0.256525 at {F_STAR:.3e} FLOPs, depth ≈ 26.0" in section
    assert "| B | 20 | sweep_b_d20 |" in section and "\n| 12 | " in section   # members, then the A/B per depth
    # members are shown in their series, not as leaderboard rows
    assert "sweep_d12" not in md[:md.index("## Miniseries")]
    csv = (out / "leaderboard.csv").read_text()
    assert csv.count(",series sweep") == 6
    page_html = (out / "leaderboard.html").read_text()
    assert "alt='series sweep'" in page_html and "Verdict:</b> lower lr vs d24_mar14" in page_html
    png = out / "figures" / "series_sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(png)[..., :3]
    orange = ((pixels[..., 0] - pixels[..., 2]) > 0.5).mean()   # arm B's colour: its points and fit were drawn
    assert orange > 0.001, orange


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs Debian's chromium (scripts/system-deps installs it)")
def test_the_series_renders_in_headless_chromium(page, tmp_path):
    _, _, out = page
    shot = tmp_path / "page.png"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "report_screenshot.py"), str(out / "leaderboard.html"),
                           "--out", str(shot), "--height", "5200"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)[..., :3]
    # nothing else on this page is orange: arm B's points and fit came through Chromium's drawing of the page
    orange = ((pixels[..., 0] - pixels[..., 2]) > 0.5) & (pixels[..., 1] > 0.35) & (pixels[..., 1] < 0.6)
    assert orange.mean() > 0.0002, orange.mean()


def test_a_series_not_yet_built_is_named_not_drawn(tmp_path, repo_config):
    cfg = with_series(repo_config, seeds=[1])
    results, out = tmp_path / "results", tmp_path / "reports"
    write_row(results, "sweep_d12", depth=12, partial=False, core_metric=0.2, time_s=100.0)
    report.build(cfg, report.load_reference(REFERENCE), results, out, results / "store")
    md = (out / "leaderboard.md").read_text()
    assert "## Miniseries sweep\n\nNot built: series sweep: members without verified results: sweep_d16 (not run)" in md
    assert "## Miniseries smoke" not in md   # nothing of it ran: not on the page
    assert not (out / "figures" / "series_sweep.png").exists()


# ----------------------------------------------------------------------------- end to end, on a CPU

@pytest.mark.slow
def test_the_smoke_miniseries_and_its_ab_build_on_a_cpu_and_a_second_run_does_nothing(smoke_run, tmp_path):
    """The issue's command, beside the smoke row's store (its data and its d2 training are reused): the
    three other members are trained, evaluated and published, series.json and the page are written; then
    nothing is left to do. With one seed: the config's two seeds double the trainings (361 s against
    ~180 s here), and the seeded A/B is checked on made-up rows against scipy above."""
    work = tmp_path / "w"
    shutil.copytree(smoke_run["dir"] / "results" / "store", work / "results" / "store")
    targets = ("results/series/smoke/series.json", "reports/leaderboard.md")
    with ShardServer(REPO / "tests" / "fixtures" / "webtext") as server:
        raw = copy.deepcopy(smoke_run["cfg"])
        raw["datasets"]["webtext"]["base_url"] = server.url
        raw["series"]["smoke"].pop("seeds")
        cfg = config.check(write_config(work, raw))
        first = snakemake(work, *targets)
        assert first.returncode == 0, first.stderr[-3000:]
        second = snakemake(work, *targets)
    assert "Nothing to be done" in second.stdout + second.stderr, second.stderr[-2000:]
    jobs = re.findall(r"^(?:local)?rule (\w+):", first.stdout + first.stderr, re.M)
    assert jobs.count("train") == 3 and jobs.count("core") == 3 and jobs.count("series") == 1
    assert not {"download", "tokenizer", "pretokenize"} & set(jobs)
    written = json.loads((work / "results" / "series" / "smoke" / "series.json").read_text())
    assert written == json.loads(json.dumps(series.build(cfg, "smoke", work / "results", work / "results" / "store")))
    assert [p["depth"] for p in written["arms"]["a"]["members"]] == [2, 4] == \
        [p["depth"] for p in written["arms"]["b"]["members"]]
    # d2 of arm A is the smoke row: trained once
    keys = {p["row"]: p["train_keys"] for a in written["arms"].values() for p in a["members"]}
    assert keys["smoke_d2"] == plan.make_plan(cfg).rows["smoke"]["train"]
    assert len({k for ks in keys.values() for k in ks}) == 4 == len(list((work / "results/store/train").iterdir()))
    flops = {p["row"]: p["total_training_flops"] for a in written["arms"].values() for p in a["members"]}
    assert flops["smoke_d4"] > flops["smoke_d2"] and flops["smoke_b_d4"] == flops["smoke_d4"]
    assert written["arms"]["a"]["fits"]["val_bpb_vs_flops"]["points"] == 2
    assert written["ab"]["verdict"].startswith("matrix_lr 0.04 vs smoke: better at ")
    md = (work / "reports" / "leaderboard.md").read_text()
    assert "## Miniseries smoke (depths 2, 4; A: smoke vs B: matrix_lr 0.04)" in md
    assert f"**Verdict:** {written['ab']['verdict']}" in md
    assert (work / "reports" / "figures" / "series_smoke.png").stat().st_size > 10_000
