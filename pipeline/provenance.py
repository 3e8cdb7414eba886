"""provenance: whether a row's published numbers can be trusted, and bringing rows in from elsewhere.

results/<row>/manifest.json holds the manifest of every store directory of the row's chain. A row
verifies when
  - each published file (core.json, train_summary.json, metrics.jsonl) is, by sha256, the store file
    its chain records; for several seeds, every seed's own file (kept under "runs") is, and the mean
    and spread recompute from them exactly;
  - each chain directory present in the store still has that manifest and files that match it.
    The report hashes every file up to REPORT_HASH_LIMIT (the JSON its numbers come from, metrics,
    tokenizer, CORE task files) and checks larger ones by size: a d26 row's chain holds ~40 GB of
    parquet and token shards (~100 MB each) and GBs of weights, minutes of hashing on every report.
    `python -m pipeline.store verify` and an import hash everything.
"""

import json
import shutil
from pathlib import Path

from pipeline import publish, store
from pipeline.errors import StageError

REPORT_HASH_LIMIT = 16 << 20
PUBLISHED = {"core.json": "core", "train_summary.json": "train", "metrics.jsonl": "train"}


def manifests(chain, stage):
    found = chain.get(stage)
    return [] if found is None else found if isinstance(found, list) else [found]


def read_row_manifest(row_dir):
    path = Path(row_dir) / store.MANIFEST
    try:
        manifest = json.loads(path.read_text())
        return manifest if isinstance(manifest.get("chain"), dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def published_problems(row_dir, chain):
    problems = []
    for name, stage in PUBLISHED.items():
        path = Path(row_dir) / name
        if not path.exists():
            continue
        stage_manifests = manifests(chain, stage)
        if not stage_manifests:
            problems.append(f"{path}: the row's {store.MANIFEST} has no {stage} stage to vouch for it")
            continue
        data = path.read_bytes()
        if len(stage_manifests) == 1 or name not in publish.SEEDED:
            record = stage_manifests[0].get("outputs", {}).get(name) or {}
            if store.sha256_bytes(data) != record.get("sha256"):
                problems.append(f"{path}: sha256 differs from {stage}/{stage_manifests[0]['key']}/{name} as its "
                                f"chain records it (edited or from another run)")
            continue
        field, mean_of = publish.SEEDED[name]
        try:
            published = json.loads(data)
            runs = [(r["seed"], r["key"], r[field]) for r in published["runs"]]
        except (ValueError, KeyError, TypeError):
            problems.append(f"{path}: not a seeds summary with a 'runs' list (edited by hand?)")
            continue
        if [key for _, key, _ in runs] != [m["key"] for m in stage_manifests]:
            problems.append(f"{path}: its runs are not the {stage} directories of its chain")
            continue
        for (seed, key, content), m in zip(runs, stage_manifests, strict=True):
            recorded = m.get("outputs", {}).get(name, {}).get("sha256")
            if store.sha256_bytes(store.json_text(content).encode()) != recorded:
                problems.append(f"{path}: seed {seed}'s {name} differs from {stage}/{key}/{name} as its chain "
                                "records it")
        if store.json_text(mean_of(runs)) != store.json_text(published):
            problems.append(f"{path}: its mean and spread do not recompute from its seeds' files (edited by hand?)")
    return problems


def chain_problems(row_dir, chain, store_root, hash_up_to=None):
    problems = []
    for stage in chain:
        for m in manifests(chain, stage):
            d = Path(store_root) / stage / m["key"]
            if not d.exists():
                continue  # published elsewhere (an imported row); its files were checked above
            try:
                here = store.read_manifest(d)
            except StageError as e:
                problems.append(str(e))
                continue
            if here != m:
                problems.append(f"{d / store.MANIFEST}: differs from the copy in {Path(row_dir) / store.MANIFEST} "
                                "(the stage was rerun after the row was published; rerun the row's target)")
            else:
                problems += store.verify(d, hash_up_to)
    return problems


def row_problems(row_dir, store_root=None, hash_up_to=None):
    """Why results/<row>/ cannot be trusted, one message per file ([] when it verifies)."""
    manifest = read_row_manifest(row_dir)
    if manifest is None:
        return [f"{Path(row_dir) / store.MANIFEST}: missing or unreadable; a row is published with its chain by "
                f"`snakemake results/{Path(row_dir).name}/core.json`"]
    problems = published_problems(row_dir, manifest["chain"])
    if store_root is not None:
        problems += chain_problems(row_dir, manifest["chain"], store_root, hash_up_to)
    return problems


# ----------------------------------------------------------------------------- import

def _row_dirs(src):
    src = Path(src)
    if (src / store.MANIFEST).is_file() and (src / "core.json").is_file():
        return [src]  # one row's directory
    return sorted(d for d in src.iterdir() if d.is_dir() and (d / store.MANIFEST).is_file()
                  and read_row_manifest(d) is not None)


def _copy_dir(src, dst):
    """A store directory copied beside its final name, then renamed: never half there."""
    tmp = dst.with_name(f".{dst.name}.importing")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tmp.rename(dst)


def import_results(src, imported, store_root, src_store=None):
    """Copy rows from a results directory made elsewhere into `imported`/<row>/, and the store
    directories of their chains that the source has into `store_root`, after checking every sha256.
    Copies nothing unless everything verifies.

    Imported rows live apart from results/<row>/ on purpose: Snakemake has no rule for them, so a
    report never tries to rebuild their missing chain here (that would mean retraining)."""
    src = Path(src)
    if not src.is_dir():
        raise StageError(f"{src}: no such directory to import")
    rows = _row_dirs(src)
    if not rows:
        raise StageError(f"{src}: no row to import (a row is a directory with {store.MANIFEST} and core.json, "
                         "as `snakemake results/<row>/core.json` leaves it)")
    src_store = Path(src_store) if src_store else src / "store"
    problems, store_dirs = [], []
    for d in rows:
        if not (d / "core.json").is_file():
            problems.append(f"{d / 'core.json'}: missing; a row is imported once it has been evaluated")
        problems += row_problems(d, src_store if src_store.is_dir() else None)
        chain = read_row_manifest(d)["chain"]
        store_dirs += [(src_store / stage / m["key"], Path(store_root) / stage / m["key"])
                       for stage in chain for m in manifests(chain, stage) if (src_store / stage / m["key"]).is_dir()]
    for have, want in store_dirs:
        if want.exists() and (not (want / store.MANIFEST).is_file()
                              or store.read_manifest(want) != store.read_manifest(have)):
            problems.append(f"{want}: already here with a different manifest; move it away to import {have}")
    for d in rows:
        dest = Path(imported) / d.name
        for name in (*PUBLISHED, store.MANIFEST):
            mine, theirs = dest / name, d / name
            if mine.is_file() and (not theirs.is_file() or mine.read_bytes() != theirs.read_bytes()):
                problems.append(f"{mine}: already imported and different from {theirs}; move {dest} away first")
    if problems:
        raise StageError(f"refusing to import {src}; nothing was copied:\n  " + "\n  ".join(problems))
    for have, want in dict.fromkeys(store_dirs):
        if not want.exists():
            want.parent.mkdir(parents=True, exist_ok=True)
            _copy_dir(have, want)
    for d in rows:
        for name in (*PUBLISHED, store.MANIFEST):  # the manifest last
            if (d / name).is_file():
                store.atomic_write(Path(imported) / d.name / name, (d / name).read_bytes())
    return [d.name for d in rows]
