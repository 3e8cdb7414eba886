"""CORE scoring speed: our batched Scorer against straightforward one-item-per-forward scoring.

reference (same run, same examples, same model): one forward pass per item (its choices stacked) and
the logits of every position, as nanochat's evaluate_example does. ours: pipeline.core.Scorer, the
lm_head on the scored positions only, one item per forward and several items per forward pass up to
--batch-tokens padded tokens. All must give the same answers; the script checks it.
Examples: every task of tests/fixtures/core_bundle_mini that is present, --items each, on a random
model of --depth with a tokenizer trained on the fixture text.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # measure this checkout
from pipeline import core, core_tasks, evaluate, tokenizer  # noqa: E402
from pipeline.model import GPT, GPTConfig  # noqa: E402


@torch.no_grad()
def one_item_at_a_time(model, examples, pad, device):
    """The straightforward scorer: each item's rows padded into one batch, logits everywhere."""
    answers = []
    for ex in examples:
        ids = torch.full((len(ex.rows), max(map(len, ex.rows))), pad, dtype=torch.long)
        for k, r in enumerate(ex.rows):
            ids[k, :len(r)] = torch.tensor(r)
        ids = ids.to(device)
        with evaluate.autocast(device):
            logits = model(ids).float()
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        predictions = logits.argmax(-1)
        answers.append(core_tasks.decide(ex, [losses[k, s - 1:e - 1].tolist() for k, (s, e) in enumerate(ex.spans)],
                                         [predictions[k, s - 1:e - 1].tolist() for k, (s, e) in enumerate(ex.spans)]))
    return answers


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--batch-tokens", type=int, default=32768)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fixture = REPO / "tests" / "fixtures" / "webtext"
    with tempfile.TemporaryDirectory() as tmp:
        texts = tokenizer.iter_texts(tokenizer.shard_files([fixture])[:1], max_chars=3_000_000)
        enc = tokenizer.save(Path(tmp), tokenizer.train_bpe(texts, 4096))
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(args.depth, enc.n_vocab, args.seq_len)).to(device)
    model.init_weights()
    model.eval()
    bos = enc.encode_single_token(tokenizer.BOS)
    examples = []
    for task in core_tasks.load_tasks(REPO / "tests" / "fixtures" / "core_bundle_mini"):
        if task.path.is_file():
            pool = core_tasks.shuffled(core_tasks.load_items(task))
            examples += [core_tasks.tokenize(task, pool[i], core_tasks.fewshot(pool, i, task.num_fewshot),
                                             enc.encode_ordinary, bos, args.seq_len) for i in range(args.items)]
    rows = sum(len(e.rows) for e in examples)
    print(f"{len(examples)} examples ({rows} prompts) from the mini bundle, d{args.depth}, seq {args.seq_len}, "
          f"{device}")
    scorers = {"reference, one item, all logits": lambda exs: one_item_at_a_time(model, exs, bos, device),
               "ours, one item per forward": core.Scorer(model, bos, device, 1).correct,
               "ours, batched": core.Scorer(model, bos, device, args.batch_tokens).correct}
    timings, answers = {}, {}
    for name, correct in scorers.items():
        correct(examples[:4])  # warm-up
        t0 = time.perf_counter()
        answers[name] = correct(examples)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings[name] = time.perf_counter() - t0
        print(f"{name:>32}: {len(examples) / timings[name]:8.1f} examples/s")
    ref, single, ours = timings.values()
    same = len(set(map(tuple, answers.values()))) == 1
    print(f"speed-up ours/reference: {ref / ours:.2f}x (one item per forward: {ref / single:.2f}x); "
          f"same answers: {same}")


if __name__ == "__main__":
    main()
