"""publish: a row's public files under results/<row>/, copied from the store (never linked).

    python -m pipeline.publish token-shards --row smoke --tokenizer DIR --blocks DIR... --out FILE
    python -m pipeline.publish copy STORE_FILE OUT      # a store file, copied (never linked) and checked
    python -m pipeline.publish train-summary --summary OUT --metrics OUT TRAIN_DIR...
    python -m pipeline.publish row --row NAME --out DIR STAGE=DIR...   # core.json + the chain's manifest
                                                     # (a hf_model row's chain: bundle and core only)

A row with several seeds has one train and one core directory per seed. Its train_summary.json and
core.json then hold the mean as the usual fields, the spread under "seeds", and every seed's own
file, unchanged, under "runs" (so each can be checked against its manifest's sha256);
metrics.jsonl is the first seed's.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from pipeline import cli, stats, store
from pipeline.core_tasks import GPT2_CORE
from pipeline.errors import StageError


def token_shards(row, tokenizer_dir, block_dirs):
    """The row's training data at a glance: keys, paths and counts, from the stage manifests."""
    tok = store.read_manifest(tokenizer_dir)
    blocks = []
    for d in block_dirs:
        manifest = store.read_manifest(d)
        index = json.loads((Path(d) / "index.json").read_text())
        blocks.append({"key": manifest["key"], "path": str(d), "shards": [s["name"] for s in index["shards"]],
                       "documents": index["documents"], "tokens": index["tokens"], "dtype": index["dtype"]})
    *train, val = blocks
    return {"row": row,
            "tokenizer": {"key": tok["key"], "path": str(tokenizer_dir), "vocab_size": tok["params"]["vocab_size"],
                          "bytes_per_token": tok["resolved"]["bytes_per_token"]},
            "train": train, "val": val,
            "train_shards": sum(len(b["shards"]) for b in train),
            "train_tokens": sum(b["tokens"] for b in train),
            "train_documents": sum(b["documents"] for b in train)}


def checked_bytes(src):
    """A file's bytes from its store directory, refusing one that no longer matches the manifest."""
    src = Path(src)
    record = store.read_manifest(src.parent)["outputs"].get(src.name)
    if record is None:
        raise StageError(f"{src} is not an output listed in {src.parent / store.MANIFEST}")
    data = src.read_bytes() if src.is_file() else b""
    if store.sha256_bytes(data) != record["sha256"]:
        raise StageError(f"{src}: missing, or its sha256 differs from its manifest (edited after the stage "
                         "wrote it); rerun its stage")
    return data


def copy_checked(src, out):
    store.atomic_write(out, checked_bytes(src))


def spread(values, bar=None):
    """Mean and spread over seeds; with `bar`, how many seeds beat it."""
    out = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
           "min": min(values), "max": max(values), "values": list(values)}
    if bar is not None:
        out["beating"] = sum(v > bar for v in values)
    return out


def seeded_runs(train_dirs, other_dirs, name):
    """[(seed, key, parsed file)] for each seed; other_dirs[i] must be the stage fed by train_dirs[i]."""
    runs = []
    for train_dir, d in zip(train_dirs, other_dirs, strict=True):
        train = store.read_manifest(train_dir)
        manifest = store.read_manifest(d)
        if d != train_dir and f"train/{train['key']}" not in manifest["inputs"]:
            raise StageError(f"{d} was not computed from {train_dir}; pass the directories in seed order")
        runs.append((train["params"].get("seed"), manifest["key"], json.loads(checked_bytes(Path(d) / name))))
    return runs


def seeds_train_summary(runs):
    """The mean training run, for a row trained once per seed."""
    summaries = [s for _, _, s in runs]
    out = dict(summaries[0])
    out["seeds"] = {"seeds": [seed for seed, _, _ in runs]}
    for field in ("total_training_time", "total_training_flops", "min_val_bpb", "val_bpb"):
        values = [s[field] for s in summaries if s.get(field) is not None]
        if len(values) == len(summaries):
            out["seeds"][field] = spread(values)
            out[field] = out["seeds"][field]["mean"]
    out["runs"] = [{"seed": seed, "key": key, "train_summary": s} for seed, key, s in runs]
    return out


def seeds_core(runs):
    """The mean CORE over seeds, its spread, how many seeds beat GPT-2 and the one-sided t-test that the
    mean does (stats.one_sided). beats_gpt2 is that test at p < stats.ALPHA, and only for a comparable
    CORE: a capped or partial one keeps its test (a smoke row's seeds still show their spread) but beats nothing."""
    cores = [c for _, _, c in runs]
    comparable = all(c.get("comparable_to_gpt2") for c in cores)
    metric = spread([c["core_metric"] for c in cores], GPT2_CORE if comparable else None)
    tasks = {t: {f: statistics.fmean(c["tasks"][t][f] for c in cores) for f in ("centered", "accuracy")}
             for t in cores[0]["tasks"] if all(t in c["tasks"] for c in cores)}
    # is the mean over seeds past GPT-2's CORE, beyond the seeds' noise (stats.ALPHA; the report may set another)
    test = stats.one_sided(metric["values"], GPT2_CORE)
    return {"core_metric": metric["mean"], "tasks": tasks, "partial": any(c["partial"] for c in cores),
            "tasks_evaluated": min(c["tasks_evaluated"] for c in cores), "max_per_task": cores[0]["max_per_task"],
            "gpt2_core": GPT2_CORE, "comparable_to_gpt2": comparable,
            "beats_gpt2": test["significant"] if comparable else None, "significance": test,
            "seeds": {"seeds": [seed for seed, _, _ in runs], "core_metric": metric},
            "runs": [{"seed": seed, "key": key, "core": c} for seed, key, c in runs]}


# published file -> (the key under which each run keeps the seed's own file, how the mean is made)
SEEDED = {"core.json": ("core", seeds_core), "train_summary.json": ("train_summary", seeds_train_summary)}


def publish_seeded(name, train_dirs, dirs, out):
    """One seed: its store file `name`, as it is; several: their mean and spread (SEEDED), with each file."""
    if len(dirs) == 1:
        copy_checked(Path(dirs[0]) / name, out)
    else:
        store.write_json(out, SEEDED[name][1](seeded_runs(train_dirs, dirs, name)))


def train_summary(train_dirs, summary_out, metrics_out):
    publish_seeded("train_summary.json", train_dirs, train_dirs, summary_out)
    copy_checked(Path(train_dirs[0]) / "metrics.jsonl", metrics_out)


def row_manifest(row, stage_dirs, command):
    """results/<row>/manifest.json: every stage manifest of the row, after checking each store
    directory against its own manifest, and the one command that reruns the row."""
    chain = {}
    for stage, dirs in stage_dirs.items():
        manifests = []
        for d in dirs:
            problems = store.verify(d)
            if problems:
                raise StageError(f"row {row}: {d} does not verify: {problems[0]}")
            manifests.append(store.read_manifest(d))
        chain[stage] = manifests[0] if len(manifests) == 1 else manifests
    return {"row": row, "command": command, "chain": chain}


@cli.user_errors
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.publish", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ts = sub.add_parser("token-shards", help="results/<row>/token_shards.json")
    ts.add_argument("--row", required=True)
    ts.add_argument("--tokenizer", required=True, help="the row's tokenizer store directory")
    ts.add_argument("--blocks", nargs="+", required=True, help="pretokenize directories, the last is validation")
    ts.add_argument("--out", required=True)
    cp = sub.add_parser("copy", help="copy one file of a store directory out, after checking its sha256")
    cp.add_argument("src")
    cp.add_argument("out")
    tr = sub.add_parser("train-summary", help="results/<row>/train_summary.json and metrics.jsonl")
    tr.add_argument("--summary", required=True)
    tr.add_argument("--metrics", required=True)
    tr.add_argument("train_dirs", nargs="+", help="the row's train store directories, one per seed")
    rw = sub.add_parser("row", help="results/<row>/core.json and manifest.json (the chain) from the store")
    rw.add_argument("--row", required=True)
    rw.add_argument("--out", required=True, help="results/<row>")
    rw.add_argument("--command", required=True, help="the command that reruns the row")
    rw.add_argument("stages", nargs="+", help="STAGE=DIR, one per store directory, in chain order")
    args = ap.parse_args(argv)
    if args.cmd == "copy":
        copy_checked(args.src, args.out)
    elif args.cmd == "train-summary":
        train_summary(args.train_dirs, args.summary, args.metrics)
    elif args.cmd == "row":
        stage_dirs = {}
        for item in args.stages:
            stage, _, d = item.partition("=")
            stage_dirs.setdefault(stage, []).append(d)
        if "core" not in stage_dirs:
            raise StageError(f"row {args.row}: no core=DIR among the stages; the row's core.json comes from its "
                             "core store directory")
        # a published model's row (hf_model) is evaluated only: its chain has no train directories
        publish_seeded("core.json", stage_dirs.get("train", []), stage_dirs["core"], Path(args.out) / "core.json")
        store.write_json(Path(args.out) / "manifest.json", row_manifest(args.row, stage_dirs, args.command))
    else:
        store.write_json(args.out, token_shards(args.row, args.tokenizer, args.blocks))


if __name__ == "__main__":
    sys.exit(main())
