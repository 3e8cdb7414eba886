"""publish: a row's public files under results/<row>/, copied from the store (never linked).

    python -m pipeline.publish token-shards --row smoke --tokenizer DIR --blocks DIR... --out FILE
    python -m pipeline.publish copy STORE_FILE OUT      # a store file, copied (never linked) and checked
    python -m pipeline.publish row --row NAME --out DIR STAGE=DIR...   # core.json + the chain's manifest
"""

import argparse
import json
import sys
from pathlib import Path

from pipeline import cli, store
from pipeline.store import StageError


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


def copy_checked(src, out):
    """Copy a file out of its store directory, refusing one that no longer matches the manifest."""
    src = Path(src)
    record = store.read_manifest(src.parent)["outputs"].get(src.name)
    if record is None:
        raise StageError(f"{src} is not an output listed in {src.parent / store.MANIFEST}")
    data = src.read_bytes()
    if store.sha256_bytes(data) != record["sha256"]:
        raise StageError(f"{src}: sha256 differs from its manifest (edited after the stage wrote it)")
    store.atomic_write(out, data)


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
    rw = sub.add_parser("row", help="results/<row>/core.json and manifest.json (the chain) from the store")
    rw.add_argument("--row", required=True)
    rw.add_argument("--out", required=True, help="results/<row>")
    rw.add_argument("--command", required=True, help="the command that reruns the row")
    rw.add_argument("stages", nargs="+", help="STAGE=DIR, one per store directory, in chain order")
    args = ap.parse_args(argv)
    if args.cmd == "copy":
        copy_checked(args.src, args.out)
    elif args.cmd == "row":
        stage_dirs = {}
        for item in args.stages:
            stage, _, d = item.partition("=")
            stage_dirs.setdefault(stage, []).append(d)
        copy_checked(Path(stage_dirs["core"][0]) / "core.json", Path(args.out) / "core.json")
        store.write_json(Path(args.out) / "manifest.json", row_manifest(args.row, stage_dirs, args.command))
    else:
        store.write_json(args.out, token_shards(args.row, args.tokenizer, args.blocks))


if __name__ == "__main__":
    sys.exit(main())
