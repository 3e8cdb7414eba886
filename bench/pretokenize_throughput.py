"""Pretokenize throughput against the ceiling of raw tiktoken on the same text and cores.

reference: enc.encode_ordinary_batch(texts, num_threads) on texts already in memory
ours:      pipeline.pretokenize.encode_shard (parquet read included) + writing both .npy files
Both run on the 3 train shards of tests/fixtures/webtext; best of --repeat. Goal: ours/reference >= 0.85.
"""

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # measure this checkout, whatever `pipeline` the venv has installed
from pipeline import pretokenize, store, tokenizer  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "webtext"
GOAL = 0.85
VOCAB = 32768  # the leaderboard's vocab; rustbpe trains it on the fixture in a few seconds


def reference(enc, paths, threads):
    seconds = tokens = 0
    for path in paths:
        texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
        t0 = time.perf_counter()
        ids = enc.encode_ordinary_batch(texts, num_threads=threads)
        seconds += time.perf_counter() - t0
        tokens += sum(map(len, ids))
    return seconds, tokens


def ours(enc, paths, threads, out):
    dtype = pretokenize.token_dtype(enc.n_vocab)
    tokens = 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for path in paths:
            toks, offsets = pretokenize.encode_shard(enc, path, pool, dtype)
            stem = path.name.removesuffix(".parquet")
            store.write_npy(out / f"{stem}.tokens.npy", toks)
            store.write_npy(out / f"{stem}.docs.npy", offsets)
            # ours adds one <|bos|> per document; the reference has none
            tokens += len(toks) - (len(offsets) - 1)
    return time.perf_counter() - t0, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    paths = [p for p in tokenizer.shard_files([FIXTURE]) if p.name != "shard_00006.parquet"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        enc = tokenizer.save(tmp / "tok", tokenizer.train_bpe(tokenizer.iter_texts(paths), VOCAB))
        print(f"tokenizer: vocab {enc.n_vocab} trained on {len(paths)} fixture shards "
              f"in {time.perf_counter() - t0:.1f} s; threads {args.threads}")
        best = {"reference": (float("inf"), 0), "ours": (float("inf"), 0)}
        for _ in range(args.repeat):  # interleaved, so drift in machine load hits both alike
            best["reference"] = min(best["reference"], reference(enc, paths, args.threads))
            best["ours"] = min(best["ours"], ours(enc, paths, args.threads, tmp))
    rates = {}
    for name, (seconds, tokens) in best.items():
        rates[name] = tokens / seconds
        print(f"{name:>9}: {tokens} tokens in {seconds:.3f} s = {rates[name] / 1e6:.2f} M tokens/s")
    if best["reference"][1] != best["ours"][1]:
        print("warning: token counts differ between reference and ours")
    ratio = rates["ours"] / rates["reference"]
    print(f"ratio ours/reference: {ratio:.3f}")
    print(f"goal: ours/reference >= {GOAL} -> {'MET' if ratio >= GOAL else 'NOT MET'}")


if __name__ == "__main__":
    main()
