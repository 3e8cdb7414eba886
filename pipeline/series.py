"""series: a miniseries (one row's recipe swept over depths) and its A/B, from the members' verified results.

    python -m pipeline.series build --name smoke --out results/series/smoke/series.json

The members are ordinary rows that the config check makes from `series:` (pipeline.config), so each
is trained, evaluated and published as any row is, and this reads only their published files, after
checking them against their chains (pipeline.results). For each arm and depth: parameters, tokens,
training FLOPs and time, val_bpb and CORE (the mean over seeds, and each seed's value). Per arm, the
power laws nanochat's scaling notebook fits (straight lines in log-log): val_bpb and CORE against
training FLOPs, FLOPs against depth, time against FLOPs; from them, the FLOPs at which the CORE fit
reaches GPT-2's 0.256525, and the depth and training time there. With a B arm, per depth the
difference B - A in val_bpb and in CORE, its spread, Welch's one-sided test where both arms have two
or more seeds, and one verdict line: B better at every depth, at some, or at none.
"""

import argparse
import math
import statistics
import sys

from pipeline import cli, config, entry, results, stats, store
from pipeline.core_tasks import GPT2_CORE
from pipeline.errors import StageError

# y against x, fitted per arm; FLOPs are the x of nanochat's scaling plots
FITS = {"val_bpb_vs_flops": ("total_training_flops", "val_bpb"),
        "core_vs_flops": ("total_training_flops", "core_metric"),
        "flops_vs_depth": ("depth", "total_training_flops"),
        "time_vs_flops": ("total_training_flops", "total_training_time")}
NAMES = {"core_metric": "CORE"}  # how a field is named in a message, where not by itself
METRICS = {"val_bpb": ("val_bpb_values", "less"), "core_metric": ("core_values", "greater")}  # which way is better


def members(cfg, name):
    """{arm: [(depth, row name)]} of series `name`, in the config's depth order."""
    if name not in cfg["series"]:
        raise StageError(f"no series named {name!r} in the config (series: {', '.join(cfg['series']) or 'none'})")
    out = {}
    for row, row_cfg in cfg["rows"].items():
        m = row_cfg.get(config.MEMBER)
        if m and m["series"] == name:
            out.setdefault(m["arm"], []).append((m["depth"], row))
    order = cfg["series"][name]["depths"]
    return {arm: sorted(rows, key=lambda dr: order.index(dr[0])) for arm, rows in sorted(out.items())}


def point(r, depth):
    """One member's numbers from its loaded, verified row (results.load_row)."""
    s, c = r["summary"], r["core"]
    trains = results.stage_manifests(r["manifest"], "train")
    counts = trains[0].get("resolved", {}).get("param_counts", {})
    tokens = s.get("tokens")
    return {"depth": depth, "row": r["row"], "params": counts.get("total"), "scaling_params": counts.get("scaling"),
            "tokens": tokens, "param_data_ratio": tokens / counts["scaling"] if tokens and counts.get("scaling")
            else None, "total_training_flops": s["total_training_flops"],
            "total_training_time": s["total_training_time"], "val_bpb": s["val_bpb"],
            "val_bpb_values": entry.seed_values(s, "val_bpb"), "core_metric": c["core_metric"],
            "core_values": entry.seed_values(c, "core_metric"), "comparable_to_gpt2": bool(c.get("comparable_to_gpt2")),
            "seeds": len(trains), "train_keys": [m["key"] for m in trains],
            "core_keys": [m["key"] for m in results.stage_manifests(r["manifest"], "core")]}


def fit(points, x, y):
    """The power law y = a x^b over the members, or why there is none."""
    xs, ys = [p[x] for p in points], [p[y] for p in points]
    if None in ys or min(ys) <= 0:
        return {"why": f"{NAMES.get(y, y)} is not positive at every depth, and a power law needs positive values"}
    try:
        return stats.power_law(xs, ys)
    except ValueError as e:
        return {"why": str(e)}


def gpt2_crossing(fits, points):
    """Where the arm's CORE fit reaches GPT-2's: the FLOPs, and the depth and training time there (by the
    FLOPs-vs-depth and time-vs-FLOPs fits); extrapolated when outside the members' FLOPs."""
    core = fits["core_vs_flops"]
    if "why" in core:
        return {"why": "CORE has no power-law fit to cross with"}
    if core["b"] <= 0:
        return {"why": f"CORE does not grow with FLOPs in this fit (exponent {core['b']:.3g}), so it never "
                       f"reaches {GPT2_CORE}"}
    flops = stats.power_law_crossing(core, GPT2_CORE)
    depth, time = fits["flops_vs_depth"], fits["time_vs_flops"]
    spanned = [p["total_training_flops"] for p in points]
    return {"core": GPT2_CORE, "flops": flops,
            "depth": stats.power_law_crossing(depth, flops) if "why" not in depth else None,
            "total_training_time": stats.power_law_at(time, flops) if "why" not in time else None,
            "extrapolated": not min(spanned) <= flops <= max(spanned),
            "comparable": all(p["comparable_to_gpt2"] for p in points)}


def _difference(a, b, metric, alpha):
    values, better = METRICS[metric]
    va, vb = a[values], b[values]
    diff = b[metric] - a[metric]
    test = stats.welch(va, vb, better)
    spread = math.sqrt(statistics.variance(va) / len(va) + statistics.variance(vb) / len(vb)) if test else None
    return {"a": a[metric], "b": b[metric], "diff": diff, "spread": spread, "p": test["p"] if test else None,
            "better": test["p"] < alpha if test else (diff < 0) == (better == "less") and diff != 0}


def _where_better(per_depth, metric):
    better = [f"d{d['depth']}" for d in per_depth if d[metric]["better"]]
    if len(better) == len(per_depth):
        return f"better at every depth ({', '.join(better)})"
    if better:
        return f"better at some depths ({', '.join(better)} of {len(per_depth)})"
    return "better at no depth"


def ab(a_points, b_points, labels, alpha):
    """Per depth, B against A in val_bpb (lower is better) and CORE (higher is better), and the verdict."""
    per_depth = [{"depth": a["depth"], **{m: _difference(a, b, m, alpha) for m in METRICS}}
                 for a, b in zip(a_points, b_points, strict=True)]
    tested = [d["val_bpb"]["p"] is not None for d in per_depth]
    basis = (f"Welch's one-sided t-test over seeds at p < {alpha}" if all(tested) else
             "the sign of the difference: one seed per member, no test possible" if not any(tested) else
             f"Welch's one-sided t-test at p < {alpha} where both arms have two or more seeds, else the sign")
    verdict = (f"{labels['b']} vs {labels['a']}: {_where_better(per_depth, 'val_bpb')} on val_bpb, "
               f"{_where_better(per_depth, 'core_metric')} on CORE ({basis})")
    return {"per_depth": per_depth, "verdict": verdict, "alpha": alpha}


def load(cfg, name, results_dir, store_root=None):
    """{arm: [(depth, loaded row)]} of series `name`, each member's files verified (results.load_row)."""
    return {arm: [(depth, results.load_row(results_dir, row, cfg["rows"][row], store_root)) for depth, row in rows]
            for arm, rows in members(cfg, name).items()}


def build(cfg, name, results_dir, store_root=None, loaded=None):
    """series.json of series `name` (from `loaded`, series.load's answer, if the caller has it): every member
    verified and present, or a StageError naming the missing."""
    loaded = loaded or load(cfg, name, results_dir, store_root)
    s = cfg["series"][name]
    missing = [f"{r['row']} ({r['status']})" for rows in loaded.values() for _, r in rows
               if r["status"] != "reproduced" or not r["summary"]]
    if missing:
        raise StageError(f"series {name}: members without verified results: {', '.join(missing)}; build them with "
                         f"`snakemake --cores all results/series/{name}/series.json`")
    labels = {arm: config.arm_label(s, arm) for arm in loaded}
    out = {"series": name, "row": s["row"], "depths": s["depths"], "gpt2_core": GPT2_CORE, "arms": {}}
    for arm, rows in loaded.items():
        points = [point(r, depth) for depth, r in rows]
        fits = {f: fit(points, x, y) for f, (x, y) in FITS.items()}
        out["arms"][arm] = {"label": labels[arm], "members": points, "fits": fits,
                            "gpt2_crossing": gpt2_crossing(fits, points)}
    if "b" in out["arms"]:
        out["ab"] = ab(out["arms"]["a"]["members"], out["arms"]["b"]["members"], labels, cfg["report"]["alpha"])
    return out


@cli.user_errors
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.series", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="results/series/<name>/series.json from the members' published files")
    b.add_argument("--name", required=True)
    b.add_argument("--config", default="config/config.yaml", help="a config (the run's checked one under Snakemake)")
    b.add_argument("--results", default="results")
    b.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cfg = config.load(args.config)
    doc = build(cfg, args.name, args.results, cfg["store_dir"])
    store.write_json(args.out, doc)
    print(f"series {args.name}: {sum(len(a['members']) for a in doc['arms'].values())} members -> {args.out}",
          file=sys.stderr)
    if "ab" in doc:
        print(doc["ab"]["verdict"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
