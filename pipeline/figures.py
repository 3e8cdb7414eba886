"""figures: the report's PNGs. val_bpb against time and FLOPs for every trained row, CORE per row
beside the published ones, CORE per task against GPT-2's, and per series (pipeline.series) val_bpb
and CORE against training FLOPs and time with the power-law fits and where CORE's fit reaches GPT-2."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from pipeline import results, stats  # noqa: E402

ARM_COLOURS = {"a": "#2e86ab", "b": "#e07a1f"}


def _curves(r):
    """(hours, flops, val_bpb) at every evaluation of the row's training run."""
    steps = {m["step"]: m for m in r["metrics"] if "loss" in m}
    resolved = results.first_train(r["manifest"]).get("resolved", {})
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
    return made


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def series_figure(doc, path):
    """One series: val_bpb and CORE (rows) against training FLOPs and time (columns), each arm's members
    and, against FLOPs, its power-law fit; on CORE, GPT-2's bar and where the fit reaches it."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.2))
    for arm, a in doc["arms"].items():
        pts, colour = a["members"], ARM_COLOURS[arm]
        crossing = a["gpt2_crossing"].get("flops")
        for row, (metric, name) in enumerate((("val_bpb", "val bpb"), ("core_metric", "CORE"))):
            for col, x in enumerate(("total_training_flops", "total_training_time")):
                ax = axes[row][col]
                ax.plot([p[x] for p in pts], [p[metric] for p in pts], "o" if col == 0 else "o-", color=colour,
                        label=f"{arm.upper()}: {a['label']}")
                for p in pts:
                    ax.annotate(f"d{p['depth']}", (p[x], p[metric]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
                ax.set(xlabel="training FLOPs" if col == 0 else "total_training_time (s)", ylabel=name)
                ax.grid(alpha=0.3)
            f = a["fits"]["val_bpb_vs_flops" if metric == "val_bpb" else "core_vs_flops"]
            if "why" not in f:
                flops = [p["total_training_flops"] for p in pts]
                top = max(flops + ([crossing] if metric == "core_metric" and crossing else []))
                xs = [min(flops) * (top / min(flops)) ** (i / 49) for i in range(50)]
                axes[row][0].plot(xs, [stats.power_law_at(f, x) for x in xs], "--", color=colour,
                                  label=f"{arm.upper()} fit: {f['a']:.3g} C^{f['b']:.3f} (r² {f['r2']:.3f})")
        if crossing:
            axes[1][0].plot([crossing], [doc["gpt2_core"]], "*", ms=12, color=colour,
                            label=f"{arm.upper()} reaches GPT-2 at {crossing:.2e} FLOPs")
    for ax in axes[1]:
        ax.axhline(doc["gpt2_core"], color="#c0392b", ls=":", label=f"GPT-2 {doc['gpt2_core']}")
    for ax in axes.flat:
        low, high = ax.get_xlim()
        if low > 0 and high / low >= 10:  # a real miniseries spans decades; a log axis over less labels badly
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.legend(fontsize=7)
    fig.suptitle(f"Miniseries {doc['series']}: depths {', '.join(map(str, doc['depths']))}")
    return _save(fig, path)
