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


MEMBER = "series_member"  # marks a row made for a series (which, arm, depth)


def member_name(series, arm, depth):
    return f"{series}_d{depth}" if arm == "a" else f"{series}_{arm}_d{depth}"


def _member(base, series, s, arm, depth):
    """A series member: the base row at another depth (arm b: with the series' changes), named as
    runs/miniseries.sh names its runs; run names are outside the keys, so sharing is unaffected."""
    change = s.get("b", {}) if arm == "b" else {}
    row = copy.deepcopy(base)
    row.pop("reference", None)  # a member reproduces no published row
    if "recipe" in change:
        row["recipe"] = change["recipe"]
    if change.get("knobs"):
        row["knobs"] = {**row.get("knobs", {}), **change["knobs"]}
    name = member_name(series, arm, depth)
    row["train"] = {**row["train"], **change.get("train", {}), "depth": depth, "run": name, "model_tag": name}
    if "seeds" in s:
        row["seeds"] = list(s["seeds"])
        row["train"].pop("seed", None)
    row["description"] = f"{series} miniseries: {arm_label(s, arm)}, d{depth}"
    row[MEMBER] = {"series": series, "arm": arm, "depth": depth}
    return name, row


def arm_label(s, arm):
    """An arm's name on the page: its label, else the row (A) or what B changes."""
    if arm == "a":
        return s.get("label") or s["row"]
    b = s["b"]
    changes = ([f"recipe {b['recipe']}"] if "recipe" in b else []) + [
        f"{k}={v}" for part in ("knobs", "train") for k, v in sorted(b.get(part, {}).items())]
    return b.get("label") or f"{s['row']} + " + ", ".join(changes)


def _series_rows(cfg):
    """(member rows, problems): every series' members, for both arms."""
    rows, members, problems = cfg["rows"], {}, []
    for series, s in cfg.get("series", {}).items():
        where = f"series.{series}"
        base = rows.get(s["row"])
        if base is None or MEMBER in base or "hf_model" in base:
            what = "not a row" if base is None else "a published model, which has no depth" if "hf_model" in base \
                else "itself a series member"
            trained = [n for n, r in rows.items() if "hf_model" not in r and MEMBER not in r]
            problems.append(f"{where}.row: {s['row']!r} is {what}; name a trained row of rows: "
                            f"({', '.join(trained) or 'none'})")
            continue
        for arm in ("a", "b") if "b" in s else ("a",):
            for depth in s["depths"]:
                name, row = _member(base, series, s, arm, depth)
                if name in rows or name in members:
                    problems.append(f"{where}: its member row {name!r} (arm {arm}, d{depth}) is already a row; "
                                    "rename the series or that row")
                members[name] = row
    return members, problems


def _with_members(cfg, sch):
    """The series' members added to rows, each checked as a row is; problems name the series field."""
    members, problems = _series_rows(cfg)
    if problems or not members:
        return problems
    cfg["rows"].update(members)
    only = {**cfg, "rows": members}
    out = []
    for message in _schema_messages(only, sch) + _cross_messages(only, sch):
        name = next(n for n in members if message.startswith(f"rows.{n}."))
        m = members[name][MEMBER]
        out.append(f"series.{m['series']} (its member {name}: arm {m['arm']} at d{m['depth']}): "
                   f"{message[len(f'rows.{name}.'):]}")
    return out


def _made_rows(cfg):
    """Drop the series members a checked config already holds (they are made again from series:); a
    row marked as a member that no series makes is refused."""
    rows = cfg.get("rows")
    if not isinstance(rows, dict):
        return []
    made = {name for name, row in rows.items() if isinstance(row, dict) and MEMBER in row}
    for name in made:
        del rows[name]
    if not made:
        return []
    members, _ = _series_rows(cfg) if isinstance(cfg.get("series"), dict) else ({}, [])
    return [f"rows.{name}.{MEMBER}: set by the config check on the rows it makes for series:; remove it (or "
            "the row) here" for name in sorted(made - set(members))]


def check(cfg, source="config/config.yaml"):
    """Validated copy of `cfg` with defaults filled in and series expanded into member rows (checking
    an already checked config gives it back unchanged); raises ConfigError listing every problem."""
    cfg = copy.deepcopy(dict(cfg))
    flag_sets = [row.get("train") for row in (cfg.get("rows") or {}).values() if isinstance(row, dict)]
    flag_sets += [s.get("b", {}).get("train") for s in (cfg.get("series") or {}).values()
                  if isinstance(s, dict) and isinstance(s.get("b"), dict)]
    for train in flag_sets:
        if isinstance(train, dict) and isinstance(train.get("compile"), bool):
            # YAML reads a bare `compile: yes` / `no` as a boolean; the flag's values are the words
            train["compile"] = "yes" if train["compile"] else "no"
    sch = schema()
    messages = _schema_messages(cfg, sch)
    if not messages:
        messages = _made_rows(cfg) or _cross_messages(cfg, sch)
    if not messages:
        messages = _with_members(cfg, sch)
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
