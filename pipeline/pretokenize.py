"""pretokenize: turn each parquet shard of a block into a memory-mappable token shard.

For every `shard_NNNNN.parquet` of the input block it writes
  shard_NNNNN.tokens.npy   every document's tokens, each document prefixed by <|bos|>, concatenated
                           (uint16 when the vocabulary fits, else uint32)
  shard_NNNNN.docs.npy     int64 offsets: document i is tokens[docs[i]:docs[i+1]]
and `index.json` for the block (dtype, bos id, per-shard document and token counts). The bytes depend
only on the input shards and the tokenizer, never on the number of threads.
"""

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline import cli, download, store, tokenizer
from pipeline.errors import StageError

CHUNK_DOCS = 64  # documents per task: large enough to hide thread hand-off, small enough to balance


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def encode_shard(enc, path, pool, dtype):
    """(tokens, offsets) for one parquet shard; documents keep their parquet order."""
    texts = tokenizer.read_texts(path)  # a shard that is not a nanochat shard is named, with the fix
    bos = np.array([enc.encode_single_token(tokenizer.BOS)], dtype=dtype)

    def encode_chunk(chunk):
        # encode_to_numpy hands back the Rust buffer without building a Python list, and releases
        # the GIL while encoding, so the threads really run in parallel.
        parts = []
        for text in chunk:
            parts.append(bos)
            parts.append(tokenizer.encode_document(enc, text).astype(dtype, copy=False))
        tokens = np.concatenate(parts) if parts else np.empty(0, dtype)
        return tokens, np.array([len(p) for p in parts[1::2]], dtype=np.int64) + 1

    chunks = [texts[i:i + CHUNK_DOCS] for i in range(0, len(texts), CHUNK_DOCS)]
    results = list(pool.map(encode_chunk, chunks))
    tokens = np.concatenate([t for t, _ in results]) if results else np.empty(0, dtype)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    if results:
        np.cumsum(np.concatenate([n for _, n in results]), out=offsets[1:])
    return tokens, offsets


def run(spec, inputs, out, work, threads):
    tok_dir, shard_dir = inputs
    enc = tokenizer.load(tok_dir)
    dtype = token_dtype(enc.n_vocab)
    download.check_intact(shard_dir)
    paths = tokenizer.shard_files([shard_dir])
    if not paths:
        raise StageError(f"{shard_dir}: no shard_*.parquet files to pretokenize")
    started = store.now_iso()
    index = {"dtype": np.dtype(dtype).name, "bos": enc.encode_single_token(tokenizer.BOS),
             "vocab_size": enc.n_vocab, "shards": []}
    files = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for path in paths:
            stem = path.name.removesuffix(".parquet")
            tokens_path, docs_path = work / f"{stem}.tokens.npy", work / f"{stem}.docs.npy"
            if tokens_path.exists() and docs_path.exists():  # done before a kill; both written atomically
                tokens, offsets = np.load(tokens_path, mmap_mode="r"), np.load(docs_path)
            else:
                tokens, offsets = encode_shard(enc, path, pool, dtype)
                store.write_npy(tokens_path, tokens)
                store.write_npy(docs_path, offsets)
            files += [f"{stem}.tokens.npy", f"{stem}.docs.npy"]
            index["shards"].append({"name": stem, "documents": len(offsets) - 1, "tokens": int(len(tokens))})
            print(f"{path.name}: {len(offsets) - 1} documents, {len(tokens)} tokens", file=sys.stderr)
    index["documents"] = sum(s["documents"] for s in index["shards"])
    if not index["documents"]:  # training or validation would find nothing to read, much later
        raise StageError(f"{shard_dir}: every shard is empty ({', '.join(p.name for p in paths)}); check the "
                         "dataset's shards, e.g. fetch them again with `python -m pipeline.download --repair "
                         f"{shard_dir}`")
    index["tokens"] = sum(s["tokens"] for s in index["shards"])
    store.write_json(work / "index.json", index)
    # the dataset commit of its shards, carried on for the stages that read several blocks (download.one_commit)
    source = store.read_manifest(shard_dir)
    resolved = {"dataset": source["params"].get("dataset"), "revision": source["resolved"].get("revision"),
                **{k: index[k] for k in ("documents", "tokens")}}
    store.seal(spec, files + ["index.json"], work, out, resolved=resolved, started_at=started)


def main(argv=None):
    return cli.run_stage("pretokenize", cli.parser("pretokenize", __doc__.splitlines()[0]), run, argv)


if __name__ == "__main__":
    sys.exit(main())
