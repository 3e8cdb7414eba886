"""The plan: a pure function from the config to one spec per stage per row, each with its store key.

This is the only place keys are computed. A key is the short sha256 of the canonical JSON of
  - the stage name,
  - its declared parameters (before any auto-resolution such as batch size or iterations),
  - the keys of its inputs,
  - a digest of the stage's own source files.
So changing a training flag or `model.py` re-keys train and everything after it, while downloads,
tokenizer and token shards keep their keys. Keys depend only on the config text and our source, never
on data, so Snakemake knows every path at parse time.

Download and pretokenize work in blocks of `block_size` consecutive shards: rows that need 170 and
370 shards of one dataset share their first 17 blocks, and the DAG stays small.
"""

import argparse
import hashlib
import json
import math
import sys
from functools import cache
from pathlib import Path

from pipeline import config as config_mod
from pipeline import dims, launch
from pipeline import recipe as recipes

PIPELINE_DIR = Path(__file__).resolve().parent
KEY_LEN = 16
KEY_PATTERN = f"[0-9a-f]{{{KEY_LEN}}}"
# The files whose content decides what a stage produces: each stage lists every pipeline module it imports,
# directly or not, except BOOKKEEPING (tests/test_plan.py checks both against the imports). Bookkeeping says
# where things go, how a stage is started and whether its config is sound, never what it computes: fixing a
# log line there must not invalidate a 3-hour training run.
BOOKKEEPING = ("cli.py", "plan.py", "store.py", "keylock.py", "config.py", "launch.py", "errors.py")
_SHARDS = ("tokenizer.py", "download.py", "fetch.py", "shards.py")  # reading shards and the tokenizer
_MODEL = ("model.py", "chunked_loss.py", "dims.py", "recipe.py", "evaluate.py", "loader.py", "device.py", "runtime.py")
STAGE_SOURCES = {
    "download": ("download.py", "fetch.py", "shards.py"),
    "tokenizer": _SHARDS,
    "pretokenize": ("pretokenize.py", *_SHARDS),
    "train": ("train.py", "optim.py", "checkpoint.py", *_MODEL, *_SHARDS),
    "bundle": ("bundle.py", "fetch.py"),
    "core": ("core.py", "core_tasks.py", "hf.py", "bundle.py", *_MODEL, *_SHARDS),
}
STAGES = ("download", "tokenizer", "pretokenize", "train", "bundle", "core")  # in chain order
TRAIN_NAME_FLAGS = launch.NAME_FLAGS  # outside the key: renaming a run must not retrain it
# nanochat dev/LOG.md: best-fit packing crops ~35% of tokens at T=2048, so shards are sized up by 1/0.65.
CROP_WASTE = 0.35

load_config = config_mod.load


def canonical(obj):
    """JSON with sorted keys; 12.0 and 12 are one value."""
    def norm(x):
        if isinstance(x, float) and x.is_integer():
            return int(x)
        if isinstance(x, dict):
            return {k: norm(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [norm(v) for v in x]
        return x
    return launch.compact_json(norm(obj))


@cache
def source_digest(stage, root=PIPELINE_DIR):
    h = hashlib.sha256()
    for name in STAGE_SOURCES[stage]:
        path = Path(root) / name
        h.update(name.encode() + b"\0")
        h.update(path.read_bytes() if path.exists() else b"<missing>")
        h.update(b"\0")
    return h.hexdigest()


def make_spec(stage, params, inputs=(), settings=None, root=PIPELINE_DIR):
    """A stage spec with its key. `inputs` are "stage/key" references of the specs it reads."""
    digest = source_digest(stage, root)
    inputs = list(inputs)
    key = hashlib.sha256(canonical({"stage": stage, "params": params, "inputs": inputs,
                                    "source_digest": digest}).encode()).hexdigest()[:KEY_LEN]
    return {"stage": stage, "key": key, "params": params, "inputs": inputs, "source_digest": digest,
            "settings": settings or {}}


def ref(spec):
    return f"{spec['stage']}/{spec['key']}"


def download_spec(cfg, dataset, shards, root=PIPELINE_DIR):
    ds = cfg["datasets"][dataset]
    # base_url is where, not what: a mirror or a loopback test server yields the same shards.
    params = {"dataset": dataset, "hf_repo": ds.get("hf_repo"), "shards": list(shards)}
    if ds.get("revision"):  # only when pinned: the keys of a dataset without one stay what they were
        params["revision"] = ds["revision"]
    settings = {"base_url": ds["base_url"], "attempts": 5, "backoff_s": 1.0, "timeout_s": 60,
                "max_parallel": ds["max_parallel"]}
    return make_spec("download", params, settings=settings, root=root)


def bundle_spec(cfg, name, root=PIPELINE_DIR):
    """The CORE bundle `name`: its url and, once pinned, its sha256 make the key (pinning re-keys it,
    so the bundle is fetched again and checked); the name only labels messages."""
    bundle = cfg["core_bundles"][name]
    params = {k: bundle[k] for k in ("url", "sha256") if k in bundle}
    return make_spec("bundle", params, settings={"name": name}, root=root)


def shard_blocks(cfg, dataset, num_shards, val_shard=None):
    """Whole blocks covering train shards 0..num_shards-1 (never reaching the validation shard: the
    dataset's last unless another is given)."""
    ds = cfg["datasets"][dataset]
    size = ds["block_size"]
    end = min(math.ceil(num_shards / size) * size, ds["val_shard"] if val_shard is None else val_shard)
    return [list(range(lo, min(lo + size, end))) for lo in range(0, end, size)]


def train_recipe(row):
    """(the row's settled train flags, its recipe's knobs): what its derived values come from."""
    commit = recipes.commit_of(row.get("recipe"))
    return recipes.settle(commit, row["train"]), recipes.knobs(commit, row.get("knobs"))


def resolve_train_shards(cfg, row):
    """`train_shards: auto` -> enough shards for the row's training tokens, allowing for cropping."""
    shards = row["train_shards"]
    if shards != "auto":
        return shards
    ds = cfg["datasets"][row["dataset"]]
    vocab = cfg["tokenizers"][row["tokenizer"]]["vocab_size"]
    tokens = dims.training_tokens(*train_recipe(row), vocab)
    need = math.ceil(tokens / (ds["tokens_per_shard"] * (1 - CROP_WASTE)))
    return max(1, min(need, ds["val_shard"]))


def resolve_val_shard(cfg, row):
    """The shard a row validates on: its own `val_shard`, else its recipe's rule: the one after its training
    shards (what `nanochat.dataset -n N` left last on disk, until 324e69c) or the dataset's last."""
    if "val_shard" in row:
        return row["val_shard"]
    if train_recipe(row)[1]["val_shard"] == "last_on_disk":
        return resolve_train_shards(cfg, row)
    return cfg["datasets"][row["dataset"]]["val_shard"]


class Plan:
    """Every spec by key, and each row's keys per stage."""

    def __init__(self):
        self.specs = {}
        self.rows = {}

    def add(self, spec):
        self.specs.setdefault(spec["key"], spec)
        return spec

    def spec(self, stage, key):
        spec = self.specs.get(key)
        if spec is None or spec["stage"] != stage:
            raise KeyError(f"no {stage} spec with key {key} in the plan of this config (a stale path? "
                           f"`python -m pipeline.plan show` lists the current keys)")
        return spec


def tokenizer_spec(plan, cfg, name, root=PIPELINE_DIR):
    tok = cfg["tokenizers"][name]
    blocks = shard_blocks(cfg, tok["dataset"], tok["train_shards"])
    downloads = [plan.add(download_spec(cfg, tok["dataset"], b, root)) for b in blocks]
    params = {k: tok[k] for k in ("vocab_size", "max_chars", "doc_cap", "train_shards")}
    val = plan.add(download_spec(cfg, tok["dataset"], [cfg["datasets"][tok["dataset"]]["val_shard"]], root))
    return plan.add(make_spec("tokenizer", params, [ref(d) for d in downloads] + [ref(val)], root=root))


def _pretokenize_spec(plan, cfg, dataset, shards, tokenizer, root):
    download = plan.add(download_spec(cfg, dataset, shards, root))
    return plan.add(make_spec("pretokenize", {}, [ref(tokenizer), ref(download)], root=root))


def _row_plan(plan, cfg, name, row, root):
    """The row's keys per stage, in order (the last pretokenize block is the validation shard)."""
    tokenizer = tokenizer_spec(plan, cfg, row["tokenizer"], root)
    dataset, val_shard = row["dataset"], resolve_val_shard(cfg, row)
    blocks = shard_blocks(cfg, dataset, resolve_train_shards(cfg, row), val_shard)
    blocks.append([val_shard])
    pretokenized = [_pretokenize_spec(plan, cfg, dataset, b, tokenizer, root) for b in blocks]
    # the recipe is part of the key: the commit, and the knobs the row overrides
    flags = {k: v for k, v in row["train"].items() if k not in TRAIN_NAME_FLAGS}
    flags["recipe"] = recipes.commit_of(row.get("recipe"))
    if row.get("knobs"):
        flags["knobs"] = row["knobs"]
    names = {k: row["train"][k] for k in TRAIN_NAME_FLAGS if k in row["train"]}
    # One training per seed; without `seeds` the flags are keyed as given, so adding the field to a
    # config later does not re-key (and retrain) the rows that do not use it.
    seeds = row.get("seeds")
    trains = [plan.add(make_spec("train", flags if seed is None else {**flags, "seed": seed},
                                 [ref(tokenizer)] + [ref(b) for b in pretokenized],
                                 settings={"row": name, "launch": row["launch"], **names}, root=root))
              for seed in seeds or [None]]
    downloads = [r for s in (tokenizer, *pretokenized) for r in s["inputs"] if r.startswith("download/")]
    keys = {"download": list(dict.fromkeys(r.split("/")[1] for r in downloads)),
            "tokenizer": [tokenizer["key"]], "pretokenize": [b["key"] for b in pretokenized],
            "train": [t["key"] for t in trains], "train_shards": sum(map(len, blocks[:-1])), "val_shard": val_shard,
            "seeds": seeds}
    core_cfg = row["core"]
    if "bundle" in core_cfg:
        bundle = plan.add(bundle_spec(cfg, core_cfg["bundle"], root))
        cores = [plan.add(make_spec(
            "core", {k: core_cfg[k] for k in ("max_per_task", "allow_missing_tasks", "bpb_tokens")},
            [ref(train), ref(bundle), ref(tokenizer), ref(pretokenized[0]), ref(pretokenized[-1])],
            settings={"row": name, "launch": row["launch"], "device_type": row["train"].get("device_type"),
                      "batch_tokens": core_cfg["batch_tokens"]}, root=root)) for train in trains]
        keys.update(bundle=[bundle["key"]], core=[c["key"] for c in cores])
    return keys


def _hf_row_plan(plan, cfg, name, row, root):
    """A published model, evaluated as is: only the bundle and the core stage."""
    core_cfg = row["core"]
    bundle = plan.add(bundle_spec(cfg, core_cfg["bundle"], root))
    core = plan.add(make_spec(
        "core", {"hf_model": row["hf_model"], **{k: core_cfg[k] for k in ("max_per_task", "allow_missing_tasks")}},
        [ref(bundle)], settings={"row": name, "launch": row["launch"], "device_type": None,
                                 "batch_tokens": core_cfg["batch_tokens"]}, root=root))
    return {"bundle": [bundle["key"]], "core": [core["key"]]}


def make_plan(cfg, root=PIPELINE_DIR):
    """Pure: the same config and sources always give the same plan. `cfg` must have been through
    pipeline.config.check (it fills the defaults this relies on)."""
    plan = Plan()
    for name, row in cfg["rows"].items():
        build = _hf_row_plan if "hf_model" in row else _row_plan
        plan.rows[name] = build(plan, cfg, name, row, root)
    return plan


def resolved_row(cfg, name):
    """A row's recipe and every value derived from it and the row's flags, without training: what
    nanochat prints when a run starts (steps, total batch, learning rates, Muon's weight decay, ...)."""
    row = cfg["rows"][name]
    if "hf_model" in row:
        return {"hf_model": row["hf_model"]}
    flags, knobs = train_recipe(row)
    commit = recipes.commit_of(row.get("recipe"))
    launch = row["launch"]
    derived = dims.derive(flags, knobs, cfg["tokenizers"][row["tokenizer"]]["vocab_size"],
                          launch["nproc_per_node"] * launch["nodes"])
    return {"recipe": commit, "recipe_is": recipes.DESCRIPTIONS[commit], "knobs_overridden": row.get("knobs", {}),
            "flags": flags, "knobs": knobs, "knob_sources": recipes.sources(commit), **derived,
            "softcap": knobs["softcap"], "train_shards": resolve_train_shards(cfg, row),
            "val_shard": resolve_val_shard(cfg, row)}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config/config.yaml")
    sub = ap.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print each row's store keys per stage")
    show.add_argument("--row", action="append", help="only these rows")
    show.add_argument("--resolved", action="store_true", help="also the row's recipe and every derived value of "
                                                               "its training (steps, batch, learning rates, ...)")
    spec = sub.add_parser("spec", help="print one spec as JSON")
    spec.add_argument("key")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
        plan = make_plan(cfg)
    except config_mod.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "spec":
        found = plan.specs.get(args.key)
        if found is None:
            print(f"error: no spec with key {args.key} in this config's plan", file=sys.stderr)
            return 2
        print(json.dumps(found, indent=2, sort_keys=True))
        return 0
    unknown = sorted(set(args.row or ()) - set(plan.rows))
    if unknown:
        print(f"error: {args.config}: no row named {', '.join(unknown)} (rows: {', '.join(plan.rows)})",
              file=sys.stderr)
        return 2
    for name, row in plan.rows.items():
        if args.row and name not in args.row:
            continue
        if args.resolved:
            row = {**row, "resolved": resolved_row(cfg, name)}
        print(json.dumps({name: row}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
