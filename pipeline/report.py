"""report: the leaderboard, regenerated from the rows' artifacts and config/reference.yaml.

    python -m pipeline.report build --config config/config.yaml --out reports
        reports/leaderboard.md    the leaderboard page's table, reproduced rows beside published ones,
                                  then one line of details per reproduced row
        reports/leaderboard.csv   the same rows, machine-readable
        reports/leaderboard.html  one self-contained page: tables and figures inline
        reports/figures/*.png     (pipeline.figures)
    and, after the rows, one section per miniseries of the config that has run (pipeline.series):
    its members, power-law fits, GPT-2 crossing, the A/B per depth and its verdict, and its figure.

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
import statistics
import sys
from pathlib import Path

import pandas as pd
import yaml

from pipeline import cli, config, entry, figures, plan, provenance, series, stats, store
from pipeline.errors import StageError
from pipeline.results import IMPORTED, first_train, load_row, stage_manifests

COLUMNS = ["#", "time", "val_bpb", "CORE", "Description", "Date", "Commit", "Contributors"]


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


def _commit(manifest):
    git = first_train(manifest).get("git") or {}
    if not git.get("commit"):
        return "-"
    return git["commit"][:7] + ("-dirty" if git.get("dirty") else "")


def recipe_text(r, ref=None):
    """The nanochat commit whose recipe the row trained (its train manifest; the config's for a row not run
    yet), its knob overrides, and whether it differs from the published row's commit."""
    if r["hf_model"]:
        return "-"
    params = first_train(r["manifest"]).get("params", {})
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
    finished = max((m.get("finished_at") or "" for m in stage_manifests(manifest, "core")), default="")
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
        core_test = entry.core_test(c, gpt2_core, alpha) if c else None  # shown for a partial CORE too
        out.append({  # numbers first; keys (long, one per seed) last
            "row": r["row"] + (" (imported)" if r["imported"] else ""),
            "hardware": f"{s['device']} x {s['world_size']}" if s else (r["hf_model"] or "-"),
            "total_training_time_s": s.get("total_training_time"), "total_training_time_h": hours,
            "total_training_flops": s.get("total_training_flops"), "steps": s.get("step"),
            "tok_per_sec": _over_runs(s, "tok_per_sec"), "mfu_percent": _over_runs(s, "mfu"), "setup": _setup(s),
            "seeds": len(stage_manifests(m, "core")) or None,
            "core_metric": c["core_metric"] if c else None, "core_std": spread.get("std"),
            "core_min": spread.get("min"), "core_max": spread.get("max"),
            "core_p": core_test["p"] if core_test else None,
            "time_p": entry.time_test(s, record_time)["p"] if s and record_time else None,
            "beats_gpt2": _verdict(c, gpt2_core, core_test),
            "cost_usd": hours * gpus * gpu_hour_usd if hours is not None and gpus else None,
            "recipe": recipe_text(r), "pipeline_commit": _commit(m),
            "command": m.get("command") or f"snakemake --cores all results/{r['row']}/core.json",
            "train_key": " ".join(t["key"] for t in stage_manifests(m, "train")) or None,
            "core_key": " ".join(t["key"] for t in stage_manifests(m, "core")) or None,
        })
    return pd.DataFrame(out)


def refusals(rows):
    """Rows whose files do not verify, with every reason."""
    return [(r["row"], p) for r in rows if r["status"] == "refused" for p in r["problems"]]


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


def _md(df):
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "".join("| " + " | ".join("-" if pd.isna(v) else str(v) for v in row) + " |\n"
                          for row in df.itertuples(index=False))


def to_markdown(board, table, refused=(), sections=()):
    shown = formatted(table)
    if "command" in shown:
        shown["command"] = [f"`{c}`" for c in shown["command"]]
    return ("# Time to GPT-2: the leaderboard, regenerated\n\n"
            "Published rows (numbers) beside this pipeline's reproductions (`ours`). Time is "
            "`total_training_time` in hours; CORE must exceed GPT-2's 0.256525.\n\n" + _md(board)
            + "\n## Reproduced rows\n\n" + (_md(shown) if len(shown) else "None yet.\n") + _refused_md(refused)
            + "".join(_series_md(sec) for sec in sections))


# ----------------------------------------------------------------------------- series

def series_sections(cfg, results, store_root=None):
    """(name, series.json's content or None, why not) for each series of the config with any member run,
    from its members' verified results (pipeline.series.build: what results/series/<name>/series.json holds)."""
    out = []
    for name in cfg["series"]:
        loaded = series.load(cfg, name, results, store_root)  # verified once, for both questions
        if all(r["status"] == "not run" for rows in loaded.values() for _, r in rows):
            continue  # nothing of it was run: not on the page
        try:
            out.append((name, series.build(cfg, name, results, store_root, loaded), None))
        except StageError as e:
            out.append((name, None, str(e)))
    return out


def _members_table(doc):
    return pd.DataFrame([{
        "arm": arm.upper(), "depth": p["depth"], "row": p["row"], "params": _fmt(p["params"], ",d"),
        "tokens": _fmt(p["tokens"], ",d"), "tokens/param": _fmt(p["param_data_ratio"], ".2f"),
        "total_training_flops": f"{p['total_training_flops']:.3e}", "total_training_time_s":
        f"{p['total_training_time']:.1f}", "val_bpb": f"{p['val_bpb']:.5f}", "CORE": f"{p['core_metric']:.4f}"
        + ("" if p["comparable_to_gpt2"] else " (capped)"), "seeds": p["seeds"]}
        for arm, a in doc["arms"].items() for p in a["members"]])


def _fit_text(f, y):
    return f["why"] if "why" in f else f"{y} = {f['a']:.4g} · C^{f['b']:.4f} (r² {f['r2']:.4f})"


def _crossing_text(c):
    if "why" in c:
        return f"no GPT-2 crossing: {c['why']}"
    text = f"CORE's fit reaches GPT-2's {c['core']} at {c['flops']:.3e} FLOPs"
    if c["depth"] is not None:
        text += f", depth ≈ {c['depth']:.1f}"
    if c["total_training_time"] is not None:
        text += f", ≈ {c['total_training_time'] / 3600:.2f} h of training as these members ran"
    notes = ["extrapolated beyond the members"] * c["extrapolated"] + [
        "CORE capped or partial here: indicative only"] * (not c["comparable"])
    return text + (f" ({'; '.join(notes)})" if notes else "")


def _fit_lines(doc):
    """One line per arm: its power-law fits in training FLOPs C, and where CORE's reaches GPT-2."""
    return [f"{arm.upper()} ({a['label']}): {_fit_text(a['fits']['val_bpb_vs_flops'], 'val_bpb')}; "
            f"{_fit_text(a['fits']['core_vs_flops'], 'CORE')}; {_crossing_text(a['gpt2_crossing'])}"
            for arm, a in doc["arms"].items()]


def _ab_table(doc):
    def cells(d, name, spec):
        pv = d["p"]
        return {f"{name} A": format(d["a"], spec), f"{name} B": format(d["b"], spec),
                f"Δ{name}": format(d["diff"], "+" + spec), f"{name} ±": _fmt(d["spread"], spec),
                f"{name} p": _fmt(pv, ".4g"), f"{name}: B better": "yes" if d["better"] else "no"}
    return pd.DataFrame([{"depth": d["depth"], **cells(d["val_bpb"], "val_bpb", ".5f"),
                          **cells(d["core_metric"], "CORE", ".4f")} for d in doc["ab"]["per_depth"]])


def _series_title(name, doc):
    arms = " vs ".join(f"{arm.upper()}: {a['label']}" for arm, a in doc["arms"].items())
    return f"Miniseries {name} (depths {', '.join(map(str, doc['depths']))}; {arms})"


def _series_md(section):
    name, doc, why = section
    if doc is None:
        return f"\n## Miniseries {name}\n\nNot built: {why}\n"
    text = f"\n## {_series_title(name, doc)}\n\n" + _md(_members_table(doc))
    text += "\nPower laws in training FLOPs C (least squares in log-log, as nanochat's scaling notebook):\n\n"
    text += "".join(f"- {line}\n" for line in _fit_lines(doc))
    if "ab" in doc:
        text += "\nA/B per depth (B - A; ± is the standard error of the difference over seeds):\n\n"
        text += _md(_ab_table(doc)) + f"\n**Verdict:** {doc['ab']['verdict']}\n"
    return text


def _series_html(section, made):
    name, doc, why = section
    if doc is None:
        return f"<h2>Miniseries {html.escape(name)}</h2><p>Not built: {html.escape(why)}</p>"
    text = (f"<h2>{html.escape(_series_title(name, doc))}</h2><div class='scroll'>"
            f"{_members_table(doc).to_html(index=False, escape=True, na_rep='-')}</div>"
            "<p>Power laws in training FLOPs C (least squares in log-log, as nanochat's scaling notebook):</p><ul>"
            + "".join(f"<li>{html.escape(line)}</li>" for line in _fit_lines(doc)) + "</ul>")
    if "ab" in doc:
        text += (f"<p>A/B per depth (B - A; ± is the standard error of the difference over seeds):</p>"
                 f"<div class='scroll'>{_ab_table(doc).to_html(index=False, escape=True, na_rep='-')}</div>"
                 f"<p class='verdict'><b>Verdict:</b> {html.escape(doc['ab']['verdict'])}</p>")
    figure = made.get(f"series_{name}")
    return text + (_img(f"series {name}", figure) if figure else "")


def _img(title, path):
    return (f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' "
            f"src='data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()}'>")


def to_html(board, table, made, refused=(), sections=()):
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "div.scroll{overflow-x:auto}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ddd;"
             "padding:4px 8px;text-align:left}th{background:#f4f6f8}tr:nth-child(even){background:#fafafa}"
             "img{max-width:100%;margin:0.5em 0}code{font-size:12px}td{white-space:nowrap}")
    images = "".join(_img(name.replace("_", " "), p) for name, p in made.items() if not name.startswith("series_"))
    reproduced = (f"<div class='scroll'>{formatted(table).to_html(index=False, escape=True, na_rep='-')}</div>"
                  if len(table) else "<p>None yet.</p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Time to GPT-2</title><style>{style}</style>"
            f"</head><body><h1>Time to GPT-2: the leaderboard, regenerated</h1>"
            f"<p>Published rows beside this pipeline's reproductions. CORE must exceed GPT-2's 0.256525.</p>"
            f"{board.replace('`', '', regex=True).to_html(index=False, escape=True)}<h2>Reproduced rows</h2>"
            f"{reproduced}{_refused_html(refused)}{''.join(_series_html(sec, made) for sec in sections)}"
            f"<h2>Figures</h2>{images}</body></html>")


def _refused_html(refused):
    if not refused:
        return ""
    items = "".join(f"<li><code>{html.escape(row)}</code>: {html.escape(p)}</li>" for row, p in refused)
    return f"<h2>Refused rows</h2><p>Their files do not verify, so none of their numbers are shown.</p><ul>{items}</ul>"


def build(cfg, reference, results, out, store_root=None):
    # a series' members are shown in their series, not as rows of the leaderboard
    rows = [load_row(results, name, row, store_root) for name, row in cfg["rows"].items() if config.MEMBER not in row]
    sections = series_sections(cfg, results, store_root)
    board = leaderboard(rows, reference)
    table = details(rows, reference["gpt2_core"], cfg["report"]["gpu_hour_usd"], cfg["report"]["alpha"],
                    entry.record(reference)[1])
    refused = refusals(rows)
    out = Path(out)
    made = figures.figures(rows, reference, cfg["report"].get("per_task_row"), out / "figures")
    for name, doc, _ in sections:
        if doc is not None:
            made[f"series_{name}"] = figures.series_figure(doc, out / "figures" / f"series_{name}.png")
    store.atomic_write(out / "leaderboard.md", to_markdown(board, table, refused, sections))
    csv = io.StringIO()
    members = [_members_table(doc).assign(kind=f"series {name}") for name, doc, _ in sections if doc is not None]
    pd.concat([board.assign(kind="leaderboard"), table.assign(kind="reproduced"), *members]).to_csv(csv, index=False)
    store.atomic_write(out / "leaderboard.csv", csv.getvalue())
    store.atomic_write(out / "leaderboard.html", to_html(board, table, made, refused, sections))
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
