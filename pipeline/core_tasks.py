"""The CORE tasks (DCLM, arXiv 2406.11794) as nanochat evaluates them: reading the bundle, drawing
few-shot examples, rendering prompts, token spans, and deciding each item from per-token losses.

Bundle layout (nanochat's eval_bundle.zip): core.yaml (`icl_tasks`), eval_meta_data.csv (random
baselines in percent), eval_data/<dataset_uri> (JSON lines).

Prompts, per item (few-shot examples drawn with random.Random(1234 + idx), never the item itself,
each rendered with its gold answer and followed by a blank line):
  multiple_choice   one prompt per choice: query + delimiter + choice; the lowest mean loss over the
                    choice tokens (after the prefix all choices share) wins
  schema            one prompt per context option, with the shared continuation; the lowest mean loss
                    over the shared suffix wins
  language_modeling context (trimmed) + delimiter + continuation; right only if greedy decoding
                    reproduces every continuation token
Every prompt starts with BOS; prompts longer than the model's context lose tokens on the left.
"""

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.errors import StageError

GPT2_CORE = 0.256525  # the 2019 GPT-2 (1.5B) checkpoint's CORE: the leaderboard's bar
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337   # every task's items are shuffled with this seed before --max-per-task cuts them
FEWSHOT_SEED = 1234   # few-shot examples for item idx come from random.Random(FEWSHOT_SEED + idx)
FIELDS = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
          "language_modeling": ("context", "continuation")}


@dataclass
class Task:
    label: str
    type: str
    path: Path
    num_fewshot: int
    delimiter: str
    random_baseline: float  # percent


def load_tasks(bundle):
    """Tasks of core.yaml in order, with their baselines; a malformed entry names core.yaml."""
    bundle = Path(bundle)
    spec_path, meta_path = bundle / "core.yaml", bundle / "eval_meta_data.csv"
    for p in (spec_path, meta_path):
        if not p.is_file():
            raise StageError(f"{p}: missing; is {bundle} an unpacked eval bundle?")
    try:
        entries = yaml.safe_load(spec_path.read_text())["icl_tasks"]
        with open(meta_path, newline="") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise StageError(f"{spec_path} or {meta_path}: cannot read the task list ({e})") from e
    if not isinstance(entries, list):
        raise StageError(f"{spec_path}: icl_tasks must be a list of tasks, not {type(entries).__name__}")
    tasks = []
    for n, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("dataset_uri"), str):
            raise StageError(f"{spec_path}: icl_tasks entry #{n} needs a label, an icl_task_type and a "
                             "dataset_uri (the task's file under eval_data/)")
        label = entry.get("label", f"#{n}")
        if entry.get("icl_task_type") not in TASK_TYPES:
            raise StageError(f"{spec_path}: task {label!r} has unknown icl_task_type "
                             f"{entry.get('icl_task_type')!r} (known: {', '.join(TASK_TYPES)})")
        if label not in baselines:
            raise StageError(f"{meta_path}: no 'Random baseline' for task {label!r}")
        tasks.append(Task(label, entry["icl_task_type"], bundle / "eval_data" / entry["dataset_uri"],
                          int(entry.get("num_fewshot", [0])[0]), entry.get("continuation_delimiter", " "),
                          baselines[label]))
    return tasks


def load_items(task):
    """The task's items, checked line by line; an error names the file and the line."""
    items = []
    try:
        # split on newlines only: JSON strings may hold U+2028, which splitlines() would cut at
        lines = task.path.read_bytes().decode("utf-8").split("\n")
    except FileNotFoundError as e:
        raise StageError(f"{task.path}: task file of {task.label!r} is missing from the bundle") from e
    except UnicodeDecodeError as e:
        raise StageError(f"{task.path}: not UTF-8 text ({e.reason} at byte {e.start}); unpack the eval bundle "
                         "again") from e
    for n, line in enumerate(lines, 1):
        if line.strip():
            where = f"{task.path}:{n}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise StageError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(item, dict):
                raise StageError(f"{where}: a {task.type} item is a JSON object with {', '.join(FIELDS[task.type])}"
                                 f"; this line holds a {type(item).__name__}")
            missing = [k for k in FIELDS[task.type] if k not in item]
            if missing:
                raise StageError(f"{where}: a {task.type} item needs {', '.join(missing)}")
            options = item.get("choices", item.get("context_options"))
            if "gold" in item and not isinstance(options, list):
                raise StageError(f"{where}: {'choices' if 'choices' in item else 'context_options'} must be a list")
            gold = item.get("gold", 0)
            # bool is an int to Python; `true` as an answer index is a broken line, not 1
            if "gold" in item and not (type(gold) is int and 0 <= gold < len(options)):
                raise StageError(f"{where}: gold {item['gold']!r} is not an index into its {len(options)} options")
            items.append(item)
    if not items:
        raise StageError(f"{task.path}: no items (an empty task file; unpack the eval bundle again)")
    return items


def shuffled(items):
    items = list(items)
    random.Random(SHUFFLE_SEED).shuffle(items)
    return items


def fewshot(items, idx, k):
    """k examples for item `idx`, drawn from all of the task's (shuffled) items but that one. nanochat
    draws from the items left after --max-per-task, which is the same when nothing is cut; drawing from
    all of them lets a small cut (8 items) still run 10-shot tasks."""
    if k <= 0:
        return []
    if len(items) - 1 < k:
        raise StageError(f"{k}-shot needs at least {k + 1} items; the task file has {len(items)}")
    rng = random.Random(FEWSHOT_SEED + idx)
    return [items[i] for i in rng.sample([i for i in range(len(items)) if i != idx], k)]


def render(task, item, shots):
    """The prompt texts of one item; for language_modeling (without, with) the continuation."""
    d = task.delimiter
    if task.type == "multiple_choice":
        head = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{d}{c}" for c in item["choices"]]
    if task.type == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [f"{head}{c}{d}{item['continuation']}" for c in item["context_options"]]
    head = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
    prompt = f"{head}{item['context'].strip()}{d}"
    return [prompt.strip(), prompt + item["continuation"]]


def common_length(rows, from_end=False):
    n = min(map(len, rows))
    for i in range(n):
        at = -1 - i if from_end else i
        if any(r[at] != rows[0][at] for r in rows):
            return i
    return n


@dataclass
class Example:
    """One item, tokenized: the rows to run and, per row, the scored token span [start, end)."""
    rows: list
    spans: list
    gold: int
    type: str


def tokenize(task, item, shots, encode, bos, max_len):
    prompts = render(task, item, shots)
    rows = [[bos] + encode(p) for p in prompts]
    if task.type == "multiple_choice":
        start = common_length(rows)
        spans = [(start, len(r)) for r in rows]
    elif task.type == "schema":
        suffix = common_length(rows, from_end=True)
        spans = [(len(r) - suffix, len(r)) for r in rows]
    else:
        without, with_ = rows
        # where the stripped prompt does not tokenize as a prefix of the full one, score what follows
        # their longest common prefix (nanochat asserts instead)
        start = len(without) if with_[:len(without)] == without else common_length(rows)
        rows, spans = [with_], [(start, len(with_))]
    if max_len is None:  # a model without a position limit (ours) sees every prompt whole
        return Example(rows, spans, item.get("gold", 0), task.type)
    clipped_rows, clipped_spans = [], []
    for r, (s, e) in zip(rows, spans, strict=True):
        crop = max(0, len(r) - max_len)  # too long for the model (GPT-2: 1024): drop tokens on the left
        clipped_rows.append(r[crop:])
        # a span's first token is scored from the position before it, so at least one must stay
        clipped_spans.append((max(1, s - crop), e - crop))
    return Example(clipped_rows, clipped_spans, item.get("gold", 0), task.type)


def decide(example, losses, predictions):
    """Whether the model got the item right, from per row `losses[i]` and `predictions[i]`: the loss and
    the argmax of each token of row i's span, in order (Scorer.score)."""
    if example.type == "language_modeling":
        (s, e), row = example.spans[0], example.rows[0]
        return list(predictions[0]) == row[s:e]
    means = [sum(span) / max(1, len(span)) for span in losses]
    return means.index(min(means)) == example.gold


def centered(accuracy, random_baseline_percent):
    b = random_baseline_percent / 100
    return (accuracy - b) / (1 - b)
