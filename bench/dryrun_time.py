"""Seconds for `snakemake -n` over every row of config/config.yaml at full shard counts.

reference: the smoke row alone (a DAG of six jobs: Snakemake's fixed start-up cost)
seed rows: every row's results/<row>/token_shards.json in one dry run
stress:    the seed rows plus `all_climbmix` (d24_climbmix with all 6542 climbmix train shards, 655 blocks)
Each case runs in a fresh temporary --directory; best of --repeat. Goal: the seed rows dry run < 5 s.
"""

import argparse
import copy
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
GOAL_S = 5.0


def dry_run(tmp, configfile, rows):
    """(seconds, {rule: jobs}) of one dry run in a directory no earlier run has touched."""
    workdir = Path(tempfile.mkdtemp(dir=tmp))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), "--cores", "all", "-n", *(f"results/{r}/token_shards.json" for r in rows)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"dry run failed:\n{out.stderr[-3000:]}")
    # the first "Job stats:" table; its rows are "<rule> <count>" up to a blank line
    table = (out.stdout + out.stderr).split("Job stats:", 1)[1].split("\n\n", 1)[0]
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
    return seconds, jobs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    seed_rows = list(cfg["rows"])
    stress = copy.deepcopy(cfg)
    stress["rows"]["all_climbmix"] = {**copy.deepcopy(cfg["rows"]["d24_climbmix"]), "train_shards": 6542}
    with tempfile.TemporaryDirectory() as tmp:
        seed_cfg, stress_cfg = Path(tmp) / "config.yaml", Path(tmp) / "stress.yaml"
        seed_cfg.write_text((REPO / "config" / "config.yaml").read_text())
        stress_cfg.write_text(yaml.safe_dump(stress, sort_keys=False))
        cases = {"smoke (reference)": (seed_cfg, ["smoke"]), "seed rows": (seed_cfg, seed_rows),
                 "stress (+all_climbmix)": (stress_cfg, seed_rows + ["all_climbmix"])}
        best = {}
        for name, (configfile, rows) in cases.items():
            best[name] = min((dry_run(tmp, configfile, rows) for _ in range(args.repeat)), key=lambda r: r[0])
    ref = best["smoke (reference)"][0]
    for name, (seconds, jobs) in best.items():
        counts = ", ".join(f"{rule} {n}" for rule, n in jobs.items() if rule != "total")
        print(f"{name:>22}: {seconds:6.2f} s  x{seconds / ref:5.2f} of smoke  {jobs.get('total')} jobs ({counts})")
    seed_s = best["seed rows"][0]
    print(f"seed rows: {seed_rows}")
    print(f"goal: every seed row dry run < {GOAL_S:g} s (all in one run: {seed_s:.2f} s) -> "
          f"{'MET' if seed_s < GOAL_S else 'NOT MET'}")


if __name__ == "__main__":
    main()
