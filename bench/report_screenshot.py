"""Render the leaderboard page in headless Chromium (Debian's `chromium`) and save a PNG to look at.

    .venv/bin/python bench/report_screenshot.py                         # reports/leaderboard.html
    .venv/bin/python bench/report_screenshot.py --demo                  # a page built from demo rows
    .venv/bin/python bench/report_screenshot.py PAGE.html --out shot.png --width 1280 --height 2600

--demo builds the page from made-up rows (two reproduced, one with three seeds, one refused, and the
`master` miniseries) so the layout can be judged before any GPU row exists; the numbers on it mean
nothing.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Flags for a machine without a display or outside network: no sandbox as root, no GPU, and none of
# the background fetches that a closed network refuses one by one.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        raise SystemExit("no chromium on PATH: apt-get install chromium (scripts/system-deps does)")
    return found


def screenshot(page, out, width=1280, height=2600, timeout=120):
    """A PNG of `page` as Chromium draws it at width x height."""
    page, out = Path(page).resolve(), Path(out).resolve()
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                               f"--window-size={width},{height}", f"--screenshot={out}", page.as_uri()],
                              capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not out.is_file():
        raise SystemExit(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return out


def demo_page(workdir):
    """The leaderboard of made-up rows, through the real report code."""
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    import yaml

    from helpers import write_row
    from pipeline import config, report

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["rows"]["d24_climbmix"]["seeds"] = [1, 2, 3]
    cfg = config.check(cfg)
    results = Path(workdir) / "results"
    write_row(results, "d24_jan29", core_metric=0.2590, partial=False, time_s=10800.0, depth=24)
    write_row(results, "d26_fp8", core_metric=0.2612, partial=False, time_s=9360.0, depth=26)
    write_row(results, "d24_climbmix", core_metric=0.2601, partial=False, time_s=7020.0, depth=24, seeds=[1, 2, 3])
    write_row(results, "d12", core_metric=0.1510, partial=False, time_s=900.0, depth=12)
    (results / "d12" / "core.json").write_text((results / "d12" / "core.json").read_text().replace("0.151", "0.351"))
    for depth in range(12, 28, 2):  # the config's `master` miniseries, on made-up power laws
        write_row(results, f"master_d{depth}", depth=depth, partial=False, core_metric=0.2565 * (depth / 25) ** 1.6,
                  val_bpb=0.72 * (depth / 24) ** -0.35, time_s=6000.0 * (depth / 24) ** 3)
    report.build(cfg, report.load_reference(REPO / "config" / "reference.yaml"), results, Path(workdir) / "reports",
                 results / "store")
    return Path(workdir) / "reports" / "leaderboard.html"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", nargs="?", default=str(REPO / "reports" / "leaderboard.html"))
    ap.add_argument("--demo", action="store_true", help="render a page built from made-up rows")
    ap.add_argument("--out", default=str(REPO / "bench" / "leaderboard.png"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2600)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        page = demo_page(tmp) if args.demo else Path(args.page)
        if not page.is_file():
            raise SystemExit(f"{page}: no page; run `snakemake --cores all reports/leaderboard.md` first")
        print(screenshot(page, args.out, args.width, args.height))


if __name__ == "__main__":
    main()
