"""Load and check config/config.yaml: the schema first, then cross references, then defaults.

Every message names the file, the row (or dataset/tokenizer) and the field, and says what would fix it.
"""

import copy
from pathlib import Path

import jsonschema
import yaml

from pipeline import dims
from pipeline import recipe as recipes
from pipeline.errors import StageError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(StageError):
    pass


def schema():
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _where(path):
    return ".".join(str(p) for p in path) or "(top level)"


def _schema_messages(cfg, sch):
    messages = []
    for err in sorted(jsonschema.Draft202012Validator(sch).iter_errors(cfg), key=lambda e: list(e.path)):
        # oneOf/not failures say little by themselves; the field's description says what is expected
        hint = err.schema.get("description") or err.parent and err.parent.schema.get("description")
        if err.validator == "oneOf" and isinstance(err.instance, dict):  # say what each form lacks
            text = " or ".join(dict.fromkeys(sub.message for sub in err.context if sub.validator == "required")) \
                or "mixes the fields of two kinds of row"
        elif err.validator in ("oneOf", "not"):
            text = f"{err.instance!r:.60} is not allowed"
        else:
            text = err.message
        messages.append(f"{_where(err.absolute_path)}: {text}" + (f" ({hint})" if hint else ""))
    return messages


def _fill_defaults(node, sch):
    """Set schema defaults on mappings in place (properties, and every entry of a named map)."""
    if not isinstance(node, dict) or sch.get("type") != "object":
        return
    for name, sub in sch.get("properties", {}).items():
        if name not in node and "default" in sub:
            node[name] = copy.deepcopy(sub["default"])
        if name in node:
            _fill_defaults(node[name], sub)
    extra = sch.get("additionalProperties")
    if isinstance(extra, dict):
        for name, value in node.items():
            if name not in sch.get("properties", {}):
                _fill_defaults(value, extra)


def _cross_messages(cfg, sch):
    out = []
    datasets, tokenizers = cfg["datasets"], cfg["tokenizers"]
    bundles = cfg.get("core_bundles", {})

    def known(kind, names):
        return f"known {kind}: {', '.join(sorted(names)) or 'none'}"

    for name, tok in tokenizers.items():
        ds = datasets.get(tok["dataset"])
        if ds is None:
            out.append(f"tokenizers.{name}.dataset: unknown dataset {tok['dataset']!r} ({known('datasets', datasets)})")
        elif tok.get("train_shards", 1) > ds["val_shard"]:
            out.append(f"tokenizers.{name}.train_shards: {tok['train_shards']} is past the end of dataset "
                       f"{tok['dataset']!r}, which has {ds['val_shard']} train shards")
    for name, row in cfg["rows"].items():
        where = f"rows.{name}"
        bundle = row.get("core", {}).get("bundle")
        if bundle is not None and bundle not in bundles:
            out.append(f"{where}.core.bundle: unknown CORE bundle {bundle!r} ({known('core_bundles', bundles)})")
        if "hf_model" in row:
            if bundle is None:
                out.append(f"{where}.core.bundle: a hf_model row is only evaluated, so it needs a CORE bundle")
            continue
        ds = datasets.get(row["dataset"])
        if ds is None:
            out.append(f"{where}.dataset: unknown dataset {row['dataset']!r} ({known('datasets', datasets)})")
        if row["tokenizer"] not in tokenizers:
            out.append(f"{where}.tokenizer: unknown tokenizer {row['tokenizer']!r} "
                       f"({known('tokenizers', tokenizers)})")
        shards = row.get("train_shards", "auto")
        if ds is not None and isinstance(shards, int) and shards > ds["val_shard"]:
            out.append(f"{where}.train_shards: {shards} is past the end of dataset {row['dataset']!r}, which has "
                       f"{ds['val_shard']} train shards (0..{ds['val_shard'] - 1}; {ds['val_shard']} validates)")
        if "seeds" in row and "seed" in row["train"]:
            out.append(f"{where}.seeds: the row also sets train.seed; keep one of them "
                       f"(seeds: [{row['train']['seed']}] for a single seed)")
        recipe_problems = _recipe_messages(where, row)
        out += recipe_problems
        if ds is not None and "val_shard" in row:
            out += _val_shard_messages(where, row, ds)
        if not recipe_problems:
            out += _batch_messages(where, row, sch)
    return out


def _recipe_messages(where, row):
    """The row's recipe exists, its knob overrides are knobs of it, and its flags are its commit's."""
    try:
        commit = recipes.commit_of(row.get("recipe"))
    except recipes.RecipeError as e:
        return [f"{where}.recipe: {e}"]
    out = [f"{where}.knobs.{name}: {problem}" for name, value in row.get("knobs", {}).items()
           if (problem := recipes.override_problem(commit, name, value))]
    out += [f"{where}.train.{name}: {problem}" for name, value in row["train"].items()
            if value not in (None, False) and (problem := recipes.flag_problem(commit, name))]
    return out


def _val_shard_messages(where, row, ds):
    shards, val = row.get("train_shards", "auto"), row["val_shard"]
    if val > ds["val_shard"]:
        return [f"{where}.val_shard: {val} is past the end of dataset {row['dataset']!r} (its last shard is "
                f"{ds['val_shard']})"]
    if isinstance(shards, int) and val < shards:
        return [f"{where}.val_shard: {val} is one of the training shards (0..{shards - 1}); validate on a shard "
                f"the row does not train on, e.g. {shards} or the dataset's last, {ds['val_shard']}"]
    return []


def _batch_messages(where, row, sch):
    launch = copy.deepcopy(row.get("launch", {}))
    _fill_defaults(launch, sch["properties"]["rows"]["additionalProperties"]["properties"]["launch"])
    train = recipes.settle(row.get("recipe"), row["train"])
    if train["total_batch_size"] == -1:
        return []  # auto-sized by the train stage, which checks the split once it knows the size
    problem = dims.batch_split_problem(train["total_batch_size"], train["device_batch_size"], train["max_seq_len"],
                                       launch["nproc_per_node"] * launch["nodes"])
    return [f"{where}.train.total_batch_size: {problem}"] if problem else []


def check(cfg, source="config/config.yaml"):
    """Validated copy of `cfg` with defaults filled in; raises ConfigError listing every problem."""
    cfg = copy.deepcopy(dict(cfg))
    for row in (cfg.get("rows") or {}).values():
        train = row.get("train") if isinstance(row, dict) else None
        if isinstance(train, dict) and isinstance(train.get("compile"), bool):
            # YAML reads a bare `compile: yes` / `no` as a boolean; the flag's values are the words
            train["compile"] = "yes" if train["compile"] else "no"
    sch = schema()
    messages = _schema_messages(cfg, sch)
    if not messages:
        messages = _cross_messages(cfg, sch)
    if messages:
        raise ConfigError(f"{source} is not valid:\n  " + "\n  ".join(messages))
    _fill_defaults(cfg, sch)
    return cfg


def load(path="config/config.yaml"):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return check(raw or {}, source=str(path))
