"""core: the DCLM CORE metric of a trained model on the eval bundle, plus bits per byte and samples.

    python -m pipeline.core --checkpoint results/store/train/<key> --bundle <dir> --max-per-task 100 --out core.json
    torchrun --standalone --nproc_per_node=8 -m pipeline.core -- --row d26_fp8     # items split over ranks
    (Snakemake passes --spec, --inputs, --out and --work)

core.json: per task accuracy, centered accuracy ((acc - baseline) / (1 - baseline)) and item counts;
core_metric = the mean centered accuracy. A bundle that lacks task files is an error unless the row
allows it (`allow_missing_tasks`); then the missing tasks are listed and core_metric is `partial`,
never comparable to GPT-2's 0.256525.
"""

import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import bundle, cli, core_tasks, evaluate, hf, launch, plan, store, tokenizer
from pipeline.device import leave_process_group, setup_device
from pipeline.errors import StageError
from pipeline.loader import DistributedLoader
from pipeline.model import GPT, GPTConfig

GPT2_CORE = core_tasks.GPT2_CORE

def load_checkpoint_model(train_dir, device):
    train_dir = Path(train_dir)
    try:
        config = GPTConfig(**json.loads((train_dir / "model.json").read_text())["config"])
        model = GPT(config)
        model.load_state_dict(torch.load(train_dir / "model.pt", map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, KeyError, TypeError) as e:
        raise StageError(f"{train_dir}: not a loadable trained model ({e})") from e
    return model.to(device).embeddings_bf16_on_cuda().eval()


def token_bytes_convention(train_dir):
    """How the run counted bytes per token for bits per byte (its recipe's token_bytes knob; "raw" for a
    model.json written before recipes were recorded)."""
    meta = json.loads((Path(train_dir) / "model.json").read_text())
    return meta.get("recipe", {}).get("knobs", {}).get("token_bytes", "raw")


class Scorer:
    """Runs examples through a model in batches of whole items (up to `batch_tokens` padded tokens),
    right-padded with BOS, which causal attention never lets an earlier position see. Only the scored
    spans need logits: with our GPT the lm_head runs on those positions alone (a few tokens of each
    prompt), not on every position x the whole vocabulary."""

    def __init__(self, model, pad, device, batch_tokens):
        self.model, self.pad, self.device, self.batch_tokens = model, pad, device, batch_tokens

    @torch.no_grad()
    def correct(self, examples):
        out = [None] * len(examples)
        order = sorted(range(len(examples)), key=lambda i: max(map(len, examples[i].rows)))
        batch = []
        for i in order:
            width = max(map(len, examples[i].rows))
            rows = sum(len(examples[j].rows) for j in batch) + len(examples[i].rows)
            if batch and rows * width > self.batch_tokens:
                self._run(examples, batch, out)
                batch = []
            batch.append(i)
        if batch:
            self._run(examples, batch, out)
        return out

    def _run(self, examples, batch, out):
        rows = [r for i in batch for r in examples[i].rows]
        losses, predictions = self.score(rows, [s for i in batch for s in examples[i].spans])
        at = 0
        for i in batch:
            n = len(examples[i].rows)
            out[i] = core_tasks.decide(examples[i], losses[at:at + n], predictions[at:at + n])
            at += n

    @torch.no_grad()
    def score(self, rows, spans):
        """Per row, the loss and the argmax prediction of each token of its span [s, e), in order: lists
        of lists. One forward pass over the rows, padded to the longest."""
        ids = torch.full((len(rows), max(map(len, rows))), self.pad, dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, :len(r)] = torch.tensor(r)
        # token p of a span is scored from position p - 1
        at_row = torch.tensor([k for k, (s, e) in enumerate(spans) for _ in range(s, e)], dtype=torch.long)
        at_pos = torch.tensor([p - 1 for s, e in spans for p in range(s, e)], dtype=torch.long)
        ids, at_row, at_pos = (t.to(self.device) for t in (ids, at_row, at_pos))
        with evaluate.autocast(self.device):
            if hasattr(self.model, "trunk"):  # our GPT
                logits = self.model.head(self.model.trunk(ids)[at_row, at_pos])
            else:  # a HuggingFace model: all logits, then the scored ones
                logits = self.model(ids)[at_row, at_pos]
        logits = logits.float()
        losses = F.cross_entropy(logits, ids[at_row, at_pos + 1], reduction="none").tolist()
        predictions = logits.argmax(-1).tolist()
        bounds = np.cumsum([0] + [e - s for s, e in spans]).tolist()
        cut = list(zip(bounds[:-1], bounds[1:], strict=True))
        return [losses[a:b] for a, b in cut], [predictions[a:b] for a, b in cut]


def evaluate_core(scorer, tasks, encode, bos, max_len, max_per_task, allow_missing, rank=0, world=1, log=print):
    """{"tasks": {...}, "missing_tasks": [...], "core_metric": ..., "partial": ...}"""
    results, missing = {}, []
    for task in tasks:
        if not task.path.is_file():
            if not allow_missing:
                raise StageError(f"{task.path}: task file of {task.label!r} is missing from the bundle (set the row's "
                                 "core.allow_missing_tasks to score only the tasks present, as a partial CORE)")
            missing.append(task.label)
            continue
        t0 = time.time()
        pool = core_tasks.shuffled(core_tasks.load_items(task))
        items = pool[:max_per_task] if max_per_task > 0 else pool
        mine = range(rank, len(items), world)
        examples = [core_tasks.tokenize(task, items[i], core_tasks.fewshot(pool, i, task.num_fewshot), encode, bos,
                                        max_len) for i in mine]
        right = torch.zeros(len(items), dtype=torch.float64, device=scorer.device)
        for i, ok in zip(mine, scorer.correct(examples), strict=True):
            right[i] = float(ok)
        if world > 1:
            dist.all_reduce(right)
        accuracy = float(right.mean())
        results[task.label] = {"type": task.type, "num_fewshot": task.num_fewshot, "items": len(items),
                               "correct": int(right.sum()), "accuracy": accuracy,
                               "random_baseline": task.random_baseline,
                               "centered": core_tasks.centered(accuracy, task.random_baseline)}
        log(f"{task.label} ({task.num_fewshot}-shot, {task.type}): accuracy {accuracy:.4f} | centered "
            f"{results[task.label]['centered']:.4f} | {len(items)} items in {time.time() - t0:.1f}s")
    if not results:
        raise StageError("no CORE task could be evaluated: every task file is missing from the bundle")
    core = sum(r["centered"] for r in results.values()) / len(results)
    return {"tasks": results, "missing_tasks": missing, "core_metric": core, "partial": bool(missing),
            "tasks_evaluated": len(results), "max_per_task": max_per_task}


def gpt2_verdict(result):
    """Comparable to GPT-2 only with every task and every item (nanochat's --core-metric-max-per-task=-1)."""
    comparable = not result["partial"] and result["max_per_task"] == -1
    return {"gpt2_core": GPT2_CORE, "comparable_to_gpt2": comparable,
            "beats_gpt2": result["core_metric"] > GPT2_CORE if comparable else None}


def bits_per_byte(model, blocks, enc, tok_dir, convention, tokens, device, rank, world):
    """nanochat's base_eval bpb: `tokens` worth of packed rows from each split, bytes counted by the
    run's recipe (evaluate.token_bytes)."""
    token_bytes = evaluate.token_bytes(enc, tok_dir, convention).to(device)
    seq, rows = model.config.sequence_len, 8
    steps = max(1, tokens // (rows * seq * world))
    out = {}
    for split, block in blocks.items():
        loader = DistributedLoader([block], rows, seq, rank, world)
        out[f"{split}_bpb"] = evaluate.evaluate_bpb(model, loader, steps, token_bytes, world)
    out["tokens_per_split"] = steps * rows * seq * world
    return out


def train_manifest(checkpoint):
    """A train store directory's manifest; None for a hand-made checkpoint folder (no manifest)."""
    checkpoint = Path(checkpoint)
    return store.read_manifest(checkpoint) if (checkpoint / store.MANIFEST).is_file() else None


def tokenizer_of(checkpoint, manifest):
    """The tokenizer store directory a train store directory was trained with, from its manifest."""
    checkpoint = Path(checkpoint)
    if manifest is None:
        raise StageError(f"{checkpoint}: no {store.MANIFEST} to find its tokenizer in (not a train store "
                         "directory); give --tokenizer <the tokenizer store directory>")
    names = [i for i in manifest["inputs"] if i.startswith("tokenizer/")]
    path = checkpoint.parent.parent / names[0] if names else None
    if path is None or not path.is_dir():
        raise StageError(f"{checkpoint}: its tokenizer ({names[0] if names else 'none named'}) is not in "
                         f"{checkpoint.parent.parent}; give --tokenizer <the tokenizer store directory>")
    return path


def model_source(hf_source=None, checkpoint=None, tokenizer_dir=None, device=None):
    """(model, encode, bos, max_len, enc or None) for our checkpoint + tokenizer, or a located HF model
    (hf.locate: a folder or hub snapshot) with the tokenizer beside it there, unless a tokenizer directory
    is given."""
    if hf_source:
        folder = hf_source.folder
        if tokenizer_dir:
            enc = tokenizer.load(tokenizer_dir)
            encode, bos = enc.encode_ordinary, enc.encode_single_token(tokenizer.BOS)
        else:  # before the weights: a broken tokenizer should not cost minutes of loading first
            own = hf.load_tokenizer(folder)
            encode, bos = own.encode_ordinary, own.bos
        model = hf.HFCausalLM(folder, device)
        return model, encode, bos, model.sequence_len, None
    enc = tokenizer.load(tokenizer_dir)
    model = load_checkpoint_model(checkpoint, device)
    # no cropping, as nanochat's base_eval does for its own GPT: its rotary tables reach 10x the context
    return model, enc.encode_ordinary, enc.encode_single_token(tokenizer.BOS), None, enc


def run(spec, inputs, out, work, threads):
    """The core stage. Inputs: train, bundle and tokenizer directories, then a train and the validation
    token-shard block; for a HuggingFace row (`hf_model`), only the bundle."""
    params = spec["params"]
    device, rank, _, world, _ = setup_device()  # the allocator is tuned for eval too
    if "hf_model" in params:
        (bundle_dir,) = map(Path, inputs)
        hf_source = hf.locate(params["hf_model"])  # a hub repo is fetched here, once; recorded below
        model, encode, bos, max_len, enc = model_source(hf_source=hf_source, device=device)
    else:
        train_dir, bundle_dir, tok_dir, train_block, val_block = map(Path, inputs)
        model, encode, bos, max_len, enc = model_source(checkpoint=train_dir, tokenizer_dir=tok_dir, device=device)
    log = print if rank == 0 else (lambda *a, **k: None)
    started = store.now_iso()
    scorer = Scorer(model, bos, device, spec["settings"].get("batch_tokens", 32768))
    result = evaluate_core(scorer, core_tasks.load_tasks(bundle_dir), encode, bos, max_len, params["max_per_task"],
                           params["allow_missing_tasks"], rank, world, log=lambda m: log(m, file=sys.stderr))
    extras = {}
    if enc is not None:  # our own model: bits per byte on its token shards, and a few samples
        extras["bpb.json"] = bits_per_byte(model, {"train": train_block, "val": val_block}, enc, tok_dir,
                                           token_bytes_convention(train_dir), params["bpb_tokens"], device, rank,
                                           world)
    if rank != 0:
        return
    if enc is not None:
        extras["samples.json"] = evaluate.greedy_samples(model, enc, device)
    bundle = store.read_manifest(bundle_dir)
    if enc is None:
        source = {"hf_model": params["hf_model"], "hf_source": hf.record(params["hf_model"], hf_source)}
    else:
        source = {"checkpoint_key": store.read_manifest(train_dir)["key"]}
    result.update(gpt2_verdict(result), **source, bundle_key=bundle["key"],
                  bundle_sha256=bundle["resolved"].get("sha256"), world_size=world)
    work.mkdir(parents=True, exist_ok=True)
    store.write_json(work / "core.json", result)
    for name, data in extras.items():
        store.write_json(work / name, data)
    store.seal(spec, ["core.json", *extras], work, out, started_at=started,
               resolved={"core_metric": result["core_metric"], "partial": result["partial"],
                         **extras.get("bpb.json", {}),
                         **({"hf_source": source["hf_source"]} if "hf_source" in source else {})})
    log(f"CORE {result['core_metric']:.4f}{' (partial)' if result['partial'] else ''} -> {out}", file=sys.stderr)


def inside_store(path, store_root):
    """What of the store `path` would be written into, if anything: the store root, a sealed directory (one
    with a manifest, in any store), or one shaped as a stage's (<stage>/<key>, sealed or left by a kill)."""
    path, store_root = Path(path).resolve(), Path(store_root).resolve()
    for d in path.parents:
        if (d / store.MANIFEST).is_file():
            return f"the sealed store directory {d}"
        if d.parent.name in plan.STAGES and re.fullmatch(plan.KEY_PATTERN, d.name):
            return f"the store directory {d}"
    if store_root == path or store_root in path.parents:
        return f"the store {store_root}"
    return None


def by_hand(args):
    """CORE of a checkpoint folder or a HuggingFace model, written to a plain file: outside the store,
    with no manifest, so nothing later builds on it (a row's stored result: its core.json target)."""
    inside = inside_store(args.out, cli.roots(args)[0])
    if inside is not None:
        raise StageError(f"--out {args.out} is inside {inside}; write the by-hand result elsewhere (the store "
                         "is only written by its stages)")
    manifest = None if args.hf_model else train_manifest(args.checkpoint)
    tok_dir = args.tokenizer or (None if args.hf_model else tokenizer_of(args.checkpoint, manifest))
    device, rank, _, world, _ = setup_device()
    hf_source = hf.locate(args.hf_model, with_tokenizer=not tok_dir) if args.hf_model else None
    model, encode, bos, max_len, _ = model_source(hf_source, args.checkpoint, tok_dir, device)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = core_tasks.load_tasks(bundle.unpacked(args.bundle, tmp))
        result = evaluate_core(Scorer(model, bos, device, args.batch_tokens), tasks, encode, bos, max_len,
                               args.max_per_task, args.allow_missing_tasks, rank, world,
                               log=lambda m: print(m, file=sys.stderr) if rank == 0 else None)
    # what the pipeline's core.json says too; a hand-made checkpoint folder has no key
    source = ({"hf_model": args.hf_model, "hf_source": hf.record(args.hf_model, hf_source)}
              if args.hf_model else {"checkpoint_key": manifest and manifest["key"]})
    if rank == 0:
        store.write_json(args.out, {**result, **gpt2_verdict(result), **source,
                                    "bundle_sha256": bundle.digest(args.bundle), "world_size": world})
        print(f"CORE {result['core_metric']:.4f} -> {args.out} (by hand: outside the store, no manifest; "
              "`snakemake results/<row>/core.json` keeps a row's result)", file=sys.stderr)


@cli.user_errors
def main(argv=None):
    ap = cli.parser("core", __doc__.splitlines()[0],
                    out_help="with --spec: the output store directory; by hand: the core.json to write")
    ap.add_argument("--checkpoint", help="a train store directory (model.pt, model.json)")
    ap.add_argument("--hf-model", help="instead: a HuggingFace causal LM, e.g. openai-community/gpt2-xl or a folder")
    ap.add_argument("--tokenizer", help="our tokenizer store directory (default: the one the --checkpoint store "
                                        "directory was trained with); an --hf-model brings its own")
    ap.add_argument("--bundle", help="an eval bundle: its folder or eval_bundle.zip")
    ap.add_argument("--max-per-task", type=int, default=-1, help="items per task (-1: all, as the leaderboard)")
    ap.add_argument("--allow-missing-tasks", action="store_true")
    ap.add_argument("--batch-tokens", type=int, default=32768, help="padded tokens per forward pass")
    args = ap.parse_args(launch.after_separator(sys.argv[1:] if argv is None else argv))
    if args.spec or args.row:
        for target in cli.targets("core", args):
            cli.run_target(target, run)
    elif (args.checkpoint or args.hf_model) and args.bundle and args.out:
        by_hand(args)
    else:
        ap.error("give --spec, --row, or --bundle and --out with --checkpoint (and --tokenizer where its store "
                 "manifest does not lead to one) or --hf-model")
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
