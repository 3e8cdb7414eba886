"""report: the leaderboard, regenerated from the rows' artifacts and config/reference.yaml.

    python -m pipeline.report build --config config/config.yaml --out reports
        reports/leaderboard.md    the leaderboard page's table, reproduced rows beside published ones,
                                  then one line of details per reproduced row
        reports/leaderboard.csv   the same rows, machine-readable
        reports/leaderboard.html  one self-contained page: tables and figures inline
        reports/figures/*.png

    python -m pipeline.report import DIR    # rows made elsewhere (a cluster's results/), sha256-checked
    python -m pipeline.report entry --row X # what a leaderboard PR needs for row X (pipeline.entry)

A row is read from results/<row>/ (core.json, train_summary.json, metrics.jsonl, manifest.json), or
from results/imported/<row>/ when it was imported; nothing is retrained. A row without them is listed
as "not run"; a row whose files do not verify against its chain (pipeline.provenance) is refused:
listed, with the reason, but none of its numbers. A partial CORE (tasks missing, or items capped) is
shown as such and never counted as beating GPT-2. A row with several seeds shows their mean, spread
and how many seeds beat GPT-2; it beats GPT-2 only where the one-sided t-test over its seeds gives p
below report.alpha (pipeline.stats). One seed allows no test, and the page says so.
"""

import argparse
import base64
import html
import io
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from pipeline import cli, config, entry, plan, provenance, stats, store  # noqa: E402
from pipeline import recipe as recipes  # noqa: E402
from pipeline.errors import StageError  # noqa: E402

IMPORTED = "imported"  # results/imported/<row>/: rows brought in by `import`
COLUMNS = ["#", "time", "val_bpb", "CORE", "Description", "Date", "Commit", "Contributors"]


def _read_json(path):
    return json.loads(path.read_text()) if path.is_file() else None


def load_row(results, name, row_cfg, store_root=None):
    """What results/<name>/ (or results/imported/<name>/) holds, or a 'not run' row."""
    d = Path(results) / name
    if not (d / "core.json").is_file() and (Path(results) / IMPORTED / name / "core.json").is_file():
        d = Path(results) / IMPORTED / name
    found = {"row": name, "description": row_cfg.get("description", name), "reference": row_cfg.get("reference"),
             "hf_model": row_cfg.get("hf_model"), "recipe": None if "hf_model" in row_cfg else recipes.commit_of(
                 row_cfg.get("recipe")), "status": "not run", "core": None, "summary": None,
             "manifest": None, "metrics": [], "problems": [], "imported": d.parent.name == IMPORTED}
    if not any((d / f).is_file() for f in provenance.PUBLISHED):
        return found
    problems = provenance.row_problems(d, store_root, provenance.REPORT_HASH_LIMIT)
    if problems:
        return {**found, "status": "refused", "problems": problems}
    core, summary = _read_json(d / "core.json"), _read_json(d / "train_summary.json")
    metrics = []
    if (d / "metrics.jsonl").is_file():
        metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {**found, "status": "reproduced" if core else "trained", "core": core, "summary": summary,
            "manifest": provenance.read_row_manifest(d), "metrics": metrics}


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _core_text(core):
    if core is None:
        return "-"
    text = f"{core['core_metric']:.4f}"
    seeds = core.get("seeds")
    if seeds:
        m = seeds["core_metric"]
        text += f" ± {m['std']:.4f} ({len(seeds['seeds'])} seeds"
        text += f", {m['beating']} beat GPT-2)" if "beating" in m else ")"
    if core.get("partial"):
        return f"{text} (partial: {core['tasks_evaluated']} tasks)"
    if not core.get("comparable_to_gpt2"):
        return f"{text} (capped at {core['max_per_task']} items)"
    return text


def _stage(manifest, stage):
    """The row's manifests of one stage (one per seed)."""
    return provenance.manifests((manifest or {}).get("chain", {}), stage)


def _first_train(manifest):
    """The first seed's train manifest ({} for a row without one): its git, resolved and params."""
    return next(iter(_stage(manifest, "train")), {})


def _commit(manifest):
    git = _first_train(manifest).get("git") or {}
    if not git.get("commit"):
        return "-"
    return git["commit"][:7] + ("-dirty" if git.get("dirty") else "")


def recipe_text(r, ref=None):
    """The nanochat commit whose recipe the row trained (its train manifest; the config's for a row not run
    yet), its knob overrides, and whether it differs from the published row's commit."""
    if r["hf_model"]:
        return "-"
    params = _first_train(r["manifest"]).get("params", {})
    recipe = params.get("recipe") or (r["recipe"] if r["status"] == "not run" else None)
    if recipe is None:
        return "unversioned recipe (trained before recipes were recorded)"
    text = f"recipe {recipe}"
    if params.get("knobs"):
        text += " + " + ", ".join(f"{k}={v}" for k, v in sorted(params["knobs"].items()))
    if ref and ref.get("commit") and ref["commit"] != recipe:
        text += f" (differs from the published {ref['commit']})"
    return text


def _date(manifest):
    finished = max((m.get("finished_at") or "" for m in _stage(manifest, "core")), default="")
    return finished[:10] or "-"


def ours_line(r, ref=None):
    """A reproduction's line: its Commit cell is the nanochat recipe it trained (the pipeline's own git
    commit is in the details)."""
    s, c = r["summary"], r["core"]
    number = f"{r['reference']} (ours)" if r["reference"] is not None else r["row"]
    if r["status"] in ("not run", "refused"):
        why = f"row `{r['row']}`" + (": does not verify, see below" if r["problems"] else "")
        return [number, r["status"], "-", "-", r["description"], "-", recipe_text(r, ref), why]
    hours = f"{s['total_training_time'] / 3600:.2f}" if s else "-"
    bpb = _fmt(s.get("min_val_bpb") if s else None, ".5f")
    return [number, hours, bpb, _core_text(c), r["description"], _date(r["manifest"]), recipe_text(r, ref),
            f"row `{r['row']}`"]


def published_line(ref):
    hours = f"{ref['time_hours']} hours" if ref["number"] == 0 else f"{ref['time_hours']:.2f}"
    return [str(ref["number"]), hours, _fmt(ref.get("val_bpb"), ".5f"), f"{ref['core']:.4f}", ref["description"],
            ref["date"], ref.get("commit") or "-", " ".join(ref["contributors"])]


def leaderboard(rows, reference):
    """The page's table: each published row, then its reproductions; then rows with no reference."""
    lines = []
    for ref in reference["rows"]:
        lines.append(published_line(ref))
        lines += [ours_line(r, ref) for r in rows if r["reference"] == ref["number"]]
    lines += [ours_line(r) for r in rows if r["reference"] is None]
    return pd.DataFrame(lines, columns=COLUMNS)


def _verdict(c, gpt2_core, test):
    """Does the row beat GPT-2? Over seeds only where the one-sided t-test (`test`, entry.core_test) says so
    at p < its alpha; one seed allows no test, and the page says so."""
    if c is None:
        return "no CORE yet"
    if not c.get("comparable_to_gpt2"):
        return "not comparable (partial)"
    if test["p"] is None:
        return "above, one seed: no test possible" if c["core_metric"] > gpt2_core else "no (one seed)"
    beating = f"{c['seeds']['core_metric']['beating']} of {test['n']} seeds beat it"
    if test["significant"]:
        return f"yes (p = {test['p']:.4f} < {test['alpha']}; {beating})"
    return f"no (p = {test['p']:.4f}, not < {test['alpha']}; {beating})"


def _setup(summary):
    """How a row trained, in a few words: precision, compile, which kernel ran attention."""
    if not summary:
        return None
    fp8 = (summary.get("fp8_layers") or {}).get("converted")
    parts = [f"fp8 ({len(fp8)} layers)" if fp8 else "bf16" if str(summary.get("device", "cpu")) != "cpu" else "fp32"]
    if summary.get("compiled"):
        parts.append("compiled")
    if summary.get("window_attention") == "fa3":
        parts.append("FlashAttention-3")
    elif summary.get("window_attention") in ("flash", "masked"):
        parts.append(f"{summary['window_attention']} windows")
    return ", ".join(parts)


def _over_runs(summary, field):
    """`field` of a train summary; for a row trained once per seed, its mean over the seeds' runs."""
    runs = summary.get("runs")
    values = [r["train_summary"].get(field) for r in runs] if runs else [summary.get(field)]
    return statistics.fmean(values) if values and None not in values else None


def details(rows, gpt2_core, gpu_hour_usd, alpha=stats.ALPHA, record_time=None):
    """One line per row that has artifacts: what it ran on, what it cost, how to rerun it."""
    out = []
    for r in rows:
        if r["status"] in ("not run", "refused"):
            continue
        s, c, m = r["summary"] or {}, r["core"], r["manifest"] or {}
        gpus = s.get("world_size", 0) if str(s.get("device", "cpu")).lower() != "cpu" else 0
        hours = s.get("total_training_time", 0) / 3600 if s else None
        spread = (c or {}).get("seeds", {}).get("core_metric", {})
        core_test = entry.core_test(c, gpt2_core, alpha) if c and c.get("comparable_to_gpt2") else None
        out.append({  # numbers first; keys (long, one per seed) last
            "row": r["row"] + (" (imported)" if r["imported"] else ""),
            "hardware": f"{s['device']} x {s['world_size']}" if s else (r["hf_model"] or "-"),
            "total_training_time_s": s.get("total_training_time"), "total_training_time_h": hours,
            "total_training_flops": s.get("total_training_flops"), "steps": s.get("step"),
            "tok_per_sec": _over_runs(s, "tok_per_sec"), "mfu_percent": _over_runs(s, "mfu"), "setup": _setup(s),
            "seeds": len(_stage(m, "core")) or None,
            "core_metric": c["core_metric"] if c else None, "core_std": spread.get("std"),
            "core_min": spread.get("min"), "core_max": spread.get("max"),
            "core_p": core_test["p"] if core_test else None,
            "time_p": entry.time_test(s, record_time)["p"] if s and record_time else None,
            "beats_gpt2": _verdict(c, gpt2_core, core_test),
            "cost_usd": hours * gpus * gpu_hour_usd if hours is not None and gpus else None,
            "recipe": recipe_text(r), "pipeline_commit": _commit(m),
            "command": m.get("command") or f"snakemake --cores all results/{r['row']}/core.json",
            "train_key": " ".join(t["key"] for t in _stage(m, "train")) or None,
            "core_key": " ".join(t["key"] for t in _stage(m, "core")) or None,
        })
    return pd.DataFrame(out)


def refusals(rows):
    """Rows whose files do not verify, with every reason."""
    return [(r["row"], p) for r in rows if r["status"] == "refused" for p in r["problems"]]


# ----------------------------------------------------------------------------- figures

def _curves(r):
    """(hours, flops, val_bpb) at every evaluation of the row's training run."""
    steps = {m["step"]: m for m in r["metrics"] if "loss" in m}
    resolved = _first_train(r["manifest"]).get("resolved", {})
    per_step = resolved.get("flops_per_token", 0) * resolved.get("total_batch_size", 0)
    pts = [(steps[m["step"]]["total_training_time"] / 3600 if m["step"] in steps else 0.0, per_step * m["step"],
            m["val_bpb"]) for m in r["metrics"] if "val_bpb" in m]
    return list(zip(*pts, strict=True)) if pts else ([], [], [])


def figures(rows, reference, per_task_row, out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    trained = [r for r in rows if r["metrics"]]
    for name, axis, label in (("val_bpb_vs_time", 0, "training time (hours)"),
                              ("val_bpb_vs_flops", 1, "training FLOPs")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in trained:
            curve = _curves(r)
            x, y = curve[axis], curve[2]
            if axis == 1:  # a log axis has no room for the evaluation before the first step
                x, y = zip(*[(a, b) for a, b in zip(x, y, strict=True) if a > 0], strict=True) or ([], [])
            ax.plot(x, y, marker="o", ms=3, label=r["row"])
        if axis == 1:
            ax.set_xscale("log")
        ax.set(xlabel=label, ylabel="val bpb", title=f"Validation bits per byte vs {label.split(' (')[0]}")
        ax.grid(alpha=0.3)
        if trained:
            ax.legend(fontsize=8)
        made[name] = _save(fig, out / f"{name}.png")
    scored = [r for r in rows if r["core"]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = [f"#{ref['number']}" for ref in reference["rows"]] + [r["row"] for r in scored]
    values = [ref["core"] for ref in reference["rows"]] + [r["core"]["core_metric"] for r in scored]
    colours = ["#bbbbbb"] * len(reference["rows"]) + ["#ff9f1c" if r["core"]["partial"] else "#2e86ab"
                                                       for r in scored]
    # seeds: the bar is the mean, the whisker spans the best and worst seed
    low = [0.0] * len(reference["rows"]) + [r["core"]["core_metric"] - r["core"]["seeds"]["core_metric"]["min"]
                                            if r["core"].get("seeds") else 0.0 for r in scored]
    high = [0.0] * len(reference["rows"]) + [r["core"]["seeds"]["core_metric"]["max"] - r["core"]["core_metric"]
                                             if r["core"].get("seeds") else 0.0 for r in scored]
    ax.bar(names, values, color=colours)
    seeded = [i for i, (lo, hi) in enumerate(zip(low, high, strict=True)) if lo or hi]
    if seeded:
        ax.errorbar(seeded, [values[i] for i in seeded], yerr=[[low[i] for i in seeded], [high[i] for i in seeded]],
                    fmt="none", ecolor="#222222", capsize=4)
    ax.axhline(reference["gpt2_core"], color="#c0392b", ls="--", label=f"GPT-2 {reference['gpt2_core']}")
    # rows differ in the third decimal: start the axis near the lowest bar, not at 0
    lows = [v - lo for v, lo in zip(values, low, strict=True)] + [reference["gpt2_core"]]
    ax.set_ylim(max(0.0, min(lows) - 0.02), max(v + hi for v, hi in zip(values, high, strict=True)) + 0.01)
    ax.set(ylabel="CORE", title="CORE per row (grey: published; orange: partial; whiskers: seeds' range)")
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    ax.legend(fontsize=8)
    made["core_per_row"] = _save(fig, out / "core_per_row.png")
    chosen = next((r for r in scored if r["row"] == per_task_row), scored[0] if scored else None)
    if chosen is not None:
        tasks = chosen["core"]["tasks"]
        labels = list(tasks)
        fig, ax = plt.subplots(figsize=(8, 4.5))
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], [tasks[t]["centered"] for t in labels], width=0.4, label=chosen["row"])
        gpt2 = reference.get("gpt2_xl_centered", {})
        ax.bar([x + 0.2 for x in xs], [gpt2.get(t, 0) for t in labels], width=0.4, color="#c0392b", alpha=0.6,
               label="GPT-2 XL (published tasks only)")
        ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=7)
        ax.set(ylabel="centered accuracy", title=f"CORE per task: {chosen['row']}")
        ax.legend(fontsize=8)
        made["per_task"] = _save(fig, out / "per_task.png")
    series = [r for r in scored if r["summary"]]
    if len({_first_train(r["manifest"]).get("params", {}).get("depth")
            for r in series}) >= 2:  # a miniseries: several depths
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
        for r in series:
            flops = r["summary"]["total_training_flops"]
            a.scatter(flops, r["core"]["core_metric"])
            b.scatter(flops, r["summary"]["min_val_bpb"])
            a.annotate(r["row"], (flops, r["core"]["core_metric"]), fontsize=7)
        for axis, name in ((a, "CORE"), (b, "val bpb")):
            axis.set(xscale="log", xlabel="training FLOPs", ylabel=name)
        made["scaling"] = _save(fig, out / "scaling.png")
    return made


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- outputs

def formatted(table):
    """The details table as people read it: rounded numbers, FLOPs in scientific notation."""
    shown = table.copy()
    for col, spec in (("total_training_time_s", ".0f"), ("total_training_time_h", ".2f"),
                      ("total_training_flops", ".3e"), ("core_metric", ".4f"), ("core_std", ".4f"),
                      ("core_min", ".4f"), ("core_max", ".4f"), ("cost_usd", ".2f"), ("tok_per_sec", ",.0f"),
                      ("mfu_percent", ".1f"), ("core_p", ".4g"), ("time_p", ".4g")):
        if col in shown:
            shown[col] = [None if pd.isna(v) else format(v, spec) for v in shown[col]]
    return shown


def _refused_md(refused):
    if not refused:
        return ""
    return ("\n## Refused rows\n\nTheir files do not verify against their chain, so none of their numbers are "
            "shown:\n\n" + "".join(f"- `{row}`: {problem}\n" for row, problem in refused))


def to_markdown(board, table, refused=()):
    def md(df):
        head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
        return head + "".join("| " + " | ".join("-" if pd.isna(v) else str(v) for v in row) + " |\n"
                              for row in df.itertuples(index=False))
    shown = formatted(table)
    if "command" in shown:
        shown["command"] = [f"`{c}`" for c in shown["command"]]
    return ("# Time to GPT-2: the leaderboard, regenerated\n\n"
            "Published rows (numbers) beside this pipeline's reproductions (`ours`). Time is "
            "`total_training_time` in hours; CORE must exceed GPT-2's 0.256525.\n\n" + md(board)
            + "\n## Reproduced rows\n\n" + (md(shown) if len(shown) else "None yet.\n") + _refused_md(refused))


def to_html(board, table, made, refused=()):
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "div.scroll{overflow-x:auto}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ddd;"
             "padding:4px 8px;text-align:left}th{background:#f4f6f8}tr:nth-child(even){background:#fafafa}"
             "img{max-width:100%;margin:0.5em 0}code{font-size:12px}td{white-space:nowrap}")
    images = "".join(f"<h3>{html.escape(name.replace('_', ' '))}</h3><img alt='{html.escape(name)}' "
                     f"src='data:image/png;base64,{base64.b64encode(Path(p).read_bytes()).decode()}'>"
                     for name, p in made.items())
    reproduced = (f"<div class='scroll'>{formatted(table).to_html(index=False, escape=True, na_rep='-')}</div>"
                  if len(table) else "<p>None yet.</p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Time to GPT-2</title><style>{style}</style>"
            f"</head><body><h1>Time to GPT-2: the leaderboard, regenerated</h1>"
            f"<p>Published rows beside this pipeline's reproductions. CORE must exceed GPT-2's 0.256525.</p>"
            f"{board.replace('`', '', regex=True).to_html(index=False, escape=True)}<h2>Reproduced rows</h2>"
            f"{reproduced}{_refused_html(refused)}<h2>Figures</h2>{images}</body></html>")


def _refused_html(refused):
    if not refused:
        return ""
    items = "".join(f"<li><code>{html.escape(row)}</code>: {html.escape(p)}</li>" for row, p in refused)
    return f"<h2>Refused rows</h2><p>Their files do not verify, so none of their numbers are shown.</p><ul>{items}</ul>"


def build(cfg, reference, results, out, store_root=None):
    rows = [load_row(results, name, row, store_root) for name, row in cfg["rows"].items()]
    board = leaderboard(rows, reference)
    table = details(rows, reference["gpt2_core"], cfg["report"]["gpu_hour_usd"], cfg["report"]["alpha"],
                    entry.record(reference)[1])
    refused = refusals(rows)
    out = Path(out)
    made = figures(rows, reference, cfg["report"].get("per_task_row"), out / "figures")
    store.atomic_write(out / "leaderboard.md", to_markdown(board, table, refused))
    csv = io.StringIO()
    pd.concat([board.assign(kind="leaderboard"), table.assign(kind="reproduced")]).to_csv(csv, index=False)
    store.atomic_write(out / "leaderboard.csv", csv.getvalue())
    store.atomic_write(out / "leaderboard.html", to_html(board, table, made, refused))
    for row, problem in refused:
        print(f"refused row {row}: {problem}", file=sys.stderr)
    return rows


def import_rows(src, cfg, results, src_store=None):
    """`import`: provenance.import_results into results/imported/, then what the user should know."""
    names = provenance.import_results(src, Path(results) / IMPORTED, cfg["store_dir"], src_store)
    current = plan.make_plan(cfg).rows
    for name in names:
        chain = provenance.read_row_manifest(Path(results) / IMPORTED / name)["chain"]
        if name not in current:
            print(f"imported {name}: not a row of this config, so the report does not list it; add it to "
                  "config/config.yaml (rows:) to show it", file=sys.stderr)
        elif [m["key"] for m in provenance.manifests(chain, "core")] != current[name].get("core"):
            print(f"imported {name}: made by another config or code than this checkout's (its keys differ); "
                  f"the report shows it, and results/{name}/ from a local run would take its place", file=sys.stderr)
        else:
            print(f"imported {name}", file=sys.stderr)
    return names


def load_reference(path):
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise StageError(f"{path}: cannot read the published leaderboard ({e})") from e


@cli.user_errors
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write reports/leaderboard.{md,csv,html} and figures")
    b.add_argument("--config", default="config/config.yaml")
    b.add_argument("--reference", default="config/reference.yaml")
    b.add_argument("--results", default="results")
    b.add_argument("--out", default="reports")
    i = sub.add_parser("import", help="bring in rows from a results directory made elsewhere, after checking "
                                      "every sha256 (into results/imported/<row>/)")
    i.add_argument("src", help="a results directory (results/<row>/ and store/), or one row's directory")
    i.add_argument("--config", default="config/config.yaml")
    i.add_argument("--results", default="results")
    i.add_argument("--src-store", help="the source's store, if not SRC/store")
    e = sub.add_parser("entry", help="print what a leaderboard PR needs for one row: its table line, launch "
                                     "command, commits, wandb summary, seeds and the two one-sided tests")
    e.add_argument("--row", required=True)
    e.add_argument("--config", default="config/config.yaml")
    e.add_argument("--reference", default="config/reference.yaml")
    e.add_argument("--results", default="results")
    e.add_argument("--contributors", default="@you", help="the table line's Contributors cell")
    args = ap.parse_args(argv)
    cfg = config.load(args.config)
    if args.cmd == "import":
        import_rows(args.src, cfg, args.results, args.src_store)
        return 0
    if args.cmd == "entry":
        if args.row not in cfg["rows"]:
            raise StageError(f"{args.config}: no row named {args.row!r} (rows: {', '.join(cfg['rows'])})")
        row = load_row(args.results, args.row, cfg["rows"][args.row], cfg["store_dir"])
        reference = load_reference(args.reference)
        print(entry.lines(entry.entry(row, reference, cfg["report"]["alpha"], args.contributors), COLUMNS), end="")
        return 0
    rows = build(cfg, load_reference(args.reference), args.results, args.out, cfg["store_dir"])
    print(f"{sum(r['status'] not in ('not run', 'refused') for r in rows)} of {len(rows)} rows have verified "
          f"results -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
