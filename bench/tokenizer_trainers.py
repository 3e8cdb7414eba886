"""Measure and choose the BPE trainer: rustbpe (pipeline/tokenizer.py) against HuggingFace `tokenizers`.

Both train a byte-level BPE with pipeline.tokenizer.SPLIT_PATTERN on the same first ~8M characters of the
fixture train shards, to the same size (vocab minus the special tokens); the ratio is rustbpe/HF training
seconds (below 1: rustbpe is faster). Compression is bytes/token on the validation shard.
"""

import argparse
import re
import sys
import time
from pathlib import Path

import regex
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # measure this checkout, whatever `pipeline` the venv has installed
from pipeline import tokenizer  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "webtext"
N_SPECIAL = len(tokenizer.SPECIAL_TOKENS)


def hf_split():
    """The Split pre-tokenizer for SPLIT_PATTERN, or for its non-possessive form if Oniguruma rejects `?+`/`++`."""
    try:
        return pre_tokenizers.Split(Regex(tokenizer.SPLIT_PATTERN), behavior="isolated"), "as is"
    except Exception as e:
        # Equivalent here: what follows `?+` and `++` never fails for want of a character they took
        # (the classes are disjoint, or the rest is optional), so the greedy forms never backtrack.
        pattern = re.sub(r"([?+])\+", r"\1", tokenizer.SPLIT_PATTERN)
        return pre_tokenizers.Split(Regex(pattern), behavior="isolated"), f"non-possessive ({e})"


def train_hf(texts, vocab, split):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab - N_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def best_of(repeat, fn):
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        runs.append((time.perf_counter() - t0, result))
    return min(runs, key=lambda r: r[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--max-chars", type=int, default=8_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    paths = tokenizer.shard_files([FIXTURE])
    train = [p for p in paths if p.name != "shard_00006.parquet"]
    texts = list(tokenizer.iter_texts(train, args.max_chars, doc_cap=10000))
    val = list(tokenizer.iter_texts([FIXTURE / "shard_00006.parquet"]))
    val_bytes = sum(len(t.encode()) for t in val)
    split, how = hf_split()
    # the same pieces on every validation document means both trainers see the same words
    same = sum([p for p, _ in split.pre_tokenize_str(t)] == regex.findall(tokenizer.SPLIT_PATTERN, t) for t in val)
    print(f"train: {len(texts)} docs, {sum(map(len, texts))} chars; val: {len(val)} docs, {val_bytes} bytes")
    print(f"HF split regex: {how}; pre-tokenization identical to tiktoken's regex on {same}/{len(val)} val docs")
    for vocab in args.vocab:
        specials = {name: vocab - N_SPECIAL + i for i, name in enumerate(tokenizer.SPECIAL_TOKENS)}
        rs_s, ranks = best_of(args.repeat, lambda v=vocab: tokenizer.train_bpe(iter(texts), v))
        hf_s, hf = best_of(args.repeat, lambda v=vocab: train_hf(texts, v, split))
        enc = tokenizer.encoding(ranks, specials)
        rs_bpt = val_bytes / sum(len(enc.encode_ordinary(t)) for t in val)
        hf_bpt = val_bytes / sum(len(e.ids) for e in hf.encode_batch(val))
        print(f"vocab {vocab}: rustbpe {rs_s:.2f} s ({len(ranks)} tokens, {rs_bpt:.3f} bytes/token)  "
              f"HF {hf_s:.2f} s ({hf.get_vocab_size()} tokens, {hf_bpt:.3f} bytes/token)  "
              f"ratio rustbpe/HF time {rs_s / hf_s:.2f}")
        met = rs_s <= hf_s and abs(rs_bpt / hf_bpt - 1) <= 0.01
        print(f"goal: vocab {vocab}: rustbpe no slower than HF, bytes/token within 1% -> {'MET' if met else 'NOT MET'}")


if __name__ == "__main__":
    main()
