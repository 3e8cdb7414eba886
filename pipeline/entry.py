"""entry: what a leaderboard PR needs for one row, from its verified results.

    python -m pipeline.report entry --row d24_mar14

The table line in the published format (the next free number), nanochat's launch command for the
row's flags and the command that rebuilds it here, the recipe and pipeline commits, the wandb-style
summary (core_metric, step, total_training_flops, total_training_time), val_bpb, the seeds and their
spread, and the two one-sided tests a record needs over its seeds: CORE above GPT-2's, and time below
the record's (pipeline.stats). A row that has not run, or does not verify, has no entry.
"""

import shlex

from pipeline import launch, provenance, stats
from pipeline.errors import StageError

SUMMARY = ("core_metric", "step", "total_training_flops", "total_training_time")


def record(reference):
    """The fastest published row (the one a new entry must beat): its number and total_training_time in s."""
    timed = [r for r in reference["rows"] if r["number"] > 0]
    best = min(timed, key=lambda r: r.get("total_training_time") or r["time_hours"] * 3600)
    return best["number"], best.get("total_training_time") or best["time_hours"] * 3600


def seed_values(published, field):
    """A seeded published file's per-seed values of `field` ([the one value] for one seed)."""
    seeds = published.get("seeds") or {}
    if field in seeds:
        return seeds[field]["values"]
    return [published[field]] if published.get(field) is not None else []


# Train parameters nanochat's base_train has no flag for: the recipe is its commit, knobs are code edits
# there, and seeds, compile and the fp8 fallback are this pipeline's
NOT_NANOCHAT_FLAGS = ("recipe", "knobs", "seed", "compile", "fp8_fallback")


def core_test(core, gpt2_core, alpha=stats.ALPHA):
    """The one-sided t-test over a published core.json's seeds that its mean CORE beats GPT-2's."""
    return stats.one_sided(seed_values(core, "core_metric"), gpt2_core, alpha=alpha)


def time_test(summary, record_time, alpha=stats.ALPHA):
    """The one-sided t-test over a train summary's seeds that its mean total_training_time is below the record's."""
    return stats.one_sided(seed_values(summary, "total_training_time"), record_time, "less", alpha=alpha)


def launch_command(train_manifest, nproc):
    """nanochat's own command for the row's flags (what a PR shows), one process per GPU as on the board."""
    params = {k: v for k, v in train_manifest["params"].items() if k not in NOT_NANOCHAT_FLAGS}
    flags = " ".join(shlex.quote(a) for a in launch.flag_args(params))
    return f"OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node={nproc} -m scripts.base_train -- {flags}"


def entry(row, reference, alpha=stats.ALPHA, contributors="@you"):
    """The entry of one loaded row (report.load_row) as a dict; `lines(...)` renders it."""
    if row["status"] != "reproduced":
        why = "does not verify: " + "; ".join(row["problems"]) if row["problems"] else row["status"]
        raise StageError(f"row {row['row']}: no entry, it {why} (build it with `snakemake --cores all "
                         f"results/{row['row']}/core.json`)")
    if row["hf_model"]:
        raise StageError(f"row {row['row']}: a published model ({row['hf_model']}) is evaluated, not trained; a "
                         "leaderboard entry is a training run")
    core, summary, manifest = row["core"], row["summary"], row["manifest"]
    trains = provenance.manifests(manifest["chain"], "train")
    number, record_time = record(reference)
    hours = summary["total_training_time"] / 3600
    recipe = trains[0]["params"].get("recipe")
    next_number = max(r["number"] for r in reference["rows"]) + 1
    table = [str(next_number), f"{hours:.2f}", f"{summary.get('min_val_bpb', summary.get('val_bpb')):.5f}",
             f"{core['core_metric']:.4f}", row["description"], (trains[0].get("finished_at") or "-")[:10],
             recipe or "-", contributors]
    git = trains[0].get("git") or {}
    return {
        "row": row["row"],
        "table": table,
        "launch": launch_command(trains[0], summary.get("world_size") or 8),
        "rebuild": manifest.get("command") or f"snakemake --cores all results/{row['row']}/core.json",
        "recipe_commit": recipe,
        "pipeline_commit": (git.get("commit") or "-") + (" (dirty)" if git.get("dirty") else ""),
        "summary": {"core_metric": core["core_metric"], "step": summary["step"],
                    "total_training_flops": summary["total_training_flops"],
                    "total_training_time": summary["total_training_time"]},
        "val_bpb": summary.get("val_bpb"), "min_val_bpb": summary.get("min_val_bpb"),
        "seeds": (core.get("seeds") or {}).get("seeds") or [trains[0]["params"].get("seed", 42)],
        "core_spread": (core.get("seeds") or {}).get("core_metric"),
        "comparable_to_gpt2": core.get("comparable_to_gpt2"),
        "core_test": core_test(core, reference["gpt2_core"], alpha),
        "time_test": time_test(summary, record_time, alpha),
        "record": {"number": number, "total_training_time": record_time},
    }


def _p(test):
    if test["p"] is None:
        return test["why"]
    verdict = "passes" if test["significant"] else "does not pass"
    return f"p = {test['p']:.4g} over {test['n']} seeds ({verdict} p < {test['alpha']}; t = {test['t']:.3f}, " \
           f"df = {test['df']})"


def lines(e, columns):
    """The entry as the text a PR description takes; `columns`: the published table's (report.COLUMNS)."""
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    out = [f"# Leaderboard entry: row {e['row']}", "", head, "| " + " | ".join(e["table"]) + " |", "",
           "Launch (nanochat):", f"    {e['launch']}", "Rebuild (this pipeline):", f"    {e['rebuild']}", "",
           f"recipe commit: {e['recipe_commit'] or '-'}", f"pipeline commit: {e['pipeline_commit']}", "",
           "wandb summary:"]
    out += [f"    {k}: {v}" for k, v in e["summary"].items()]
    out += [f"val_bpb: {e['val_bpb']}" + (f" (min {e['min_val_bpb']})" if e["min_val_bpb"] is not None else ""),
            f"seeds: {', '.join(map(str, e['seeds']))}"]
    if e["core_spread"]:
        s = e["core_spread"]
        out.append(f"CORE over seeds: mean {s['mean']:.4f}, std {s['std']:.4f}, min {s['min']:.4f}, "
                   f"max {s['max']:.4f}")
    if not e["comparable_to_gpt2"]:
        out.append("CORE > GPT-2's 0.256525: not comparable (a partial CORE: tasks missing or items capped)")
    else:
        out.append(f"CORE > GPT-2's 0.256525: {_p(e['core_test'])}")
    out.append(f"time < record (#{e['record']['number']}, {e['record']['total_training_time']:.0f} s): "
               f"{_p(e['time_test'])}")
    return "\n".join(out) + "\n"
