"""tokenizer: train a GPT-4-style byte-level BPE (rustbpe) and save it for tiktoken.

Trained on the first `max_chars` characters of the first `train_shards` train shards, each document
cropped to `doc_cap` characters (nanochat's tok_train). Written files:
  tokenizer.tiktoken   merges in tiktoken's own format (base64 token, rank)
  tokenizer.json       split pattern, special tokens and their ids, vocab size
  token_bytes.npy      int32 bytes per token id (0 for special tokens), for bits per byte
  compression.json     bytes/token on the validation shard and training facts
"""

import base64
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rustbpe
import tiktoken

from pipeline import cli, download, shards, store
from pipeline.errors import StageError

# Numbers split into groups of at most 2 digits (\p{N}{1,2}, not GPT-4's {1,3}): nanochat measured a
# lower val_bpb for it at a 32K vocab (dev/LOG.md, Jan 13 2026).
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
BOS = "<|bos|>"
FILES = ("tokenizer.tiktoken", "tokenizer.json", "token_bytes.npy", "compression.json")


def shard_files(dirs):
    """Every parquet shard in the given download directories, in shard order."""
    return sorted((p for d in dirs for p in Path(d).glob("shard_*.parquet")), key=lambda p: p.name)


def _refuse(path, what):
    return StageError(f"{path}: {what}; nanochat shards are parquet files with a 'text' column of UTF-8 strings "
                      "(fetch the shard again: `python -m pipeline.download --repair <its download directory>`)")


def read_row_groups(path):
    """The `text` of each row group of one shard, as Python strings; a shard that is not what a
    nanochat shard is raises StageError naming the file and what is wrong with it."""
    try:  # the download stage's own check, so that every stage refuses the same files for the same reasons
        for column in shards.text_groups(shards.open_shard(path)):
            yield column.to_pylist()
    except shards.ShardProblem as e:
        raise _refuse(path, str(e)) from e


def read_texts(path):
    """Every document of one shard, in order."""
    return [text for group in read_row_groups(path) for text in group]


def iter_texts(paths, max_chars=None, doc_cap=None, batch=None):
    """Documents of `paths` in order, cropped to doc_cap, until max_chars have been yielded."""
    total = 0
    for path in paths:
        for group in read_row_groups(path):
            for text in group:
                text = text[:doc_cap] if doc_cap else text
                yield text
                total += len(text)
                if max_chars is not None and total >= max_chars:
                    return


class TooFewMerges(StageError):
    """The text ran out of repeated pairs before the vocabulary was full."""


def train_bpe(texts, vocab_size):
    """Merges for vocab_size - len(SPECIAL_TOKENS) byte-level tokens; returns {token bytes: rank}."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise StageError(f"vocab_size {vocab_size} is below 256 bytes + {len(SPECIAL_TOKENS)} special tokens")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts, vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(tok): rank for tok, rank in bpe.get_mergeable_ranks()}
    wanted = vocab_size - len(SPECIAL_TOKENS)
    if len(ranks) < wanted:
        # rustbpe stops when no pair repeats; a smaller vocabulary than configured would go unnoticed
        raise TooFewMerges(f"the training text gave only {len(ranks) - 256} of the {wanted - 256} merges that "
                           f"vocab_size {vocab_size} needs; give the tokenizer more text (train_shards, max_chars) "
                           "or a smaller vocab_size")
    return ranks


# Longest whitespace run handed to tiktoken in one piece: its regex gives up on runs of about 1M
# characters ("Max stack size exceeded for backtracking"); a piece this long tokenizes in a millisecond.
WHITESPACE_PIECE = 1 << 16
LONG_WHITESPACE = re.compile(rf"\s{{{WHITESPACE_PIECE + 1},}}")


def encode_document(enc, text):
    """Tokens of one document (special-token text encoded as ordinary text), as a numpy array.
    A document with a whitespace run of over 64K characters is encoded in pieces cut inside those runs:
    the tokens still decode to the exact text; only the merges across each cut may differ."""
    if not LONG_WHITESPACE.search(text):
        return enc.encode_to_numpy(text, disallowed_special=())
    cuts = [0]
    for m in LONG_WHITESPACE.finditer(text):
        cuts += range(m.start() + WHITESPACE_PIECE, m.end(), WHITESPACE_PIECE)
    cuts.append(len(text))
    return np.concatenate([enc.encode_to_numpy(text[a:b], disallowed_special=())
                           for a, b in zip(cuts, cuts[1:], strict=False) if b > a])


def encoding(ranks, special_tokens, pattern=SPLIT_PATTERN, name="speedrun"):
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)


def save(directory, ranks):
    """Write tokenizer.tiktoken + tokenizer.json; special tokens take the ids after the merges."""
    directory = Path(directory)
    offset = len(ranks)
    specials = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
    lines = (f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda x: x[1]))
    store.atomic_write(directory / "tokenizer.tiktoken", "".join(lines))
    store.write_json(directory / "tokenizer.json", {"pattern": SPLIT_PATTERN, "special_tokens": specials,
                                                    "vocab_size": offset + len(specials), "bos": BOS})
    return encoding(ranks, specials)


def load(directory):
    """The tiktoken Encoding saved in `directory` (a tokenizer store directory)."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "tokenizer.json").read_text())
        ranks = {}
        for line in (directory / "tokenizer.tiktoken").read_text().splitlines():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    except (OSError, ValueError) as e:
        raise StageError(f"{directory}: not a readable tokenizer ({e}); rerun its tokenizer stage") from e
    return encoding(ranks, meta["special_tokens"], meta["pattern"])


def token_bytes(enc):
    """Bytes each token id stands for; special tokens count 0 so they add nothing to bits per byte."""
    special = {enc.encode_single_token(name) for name in enc.special_tokens_set}
    return np.array([0 if i in special else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)],
                    dtype=np.int32)


def compression(enc, paths, threads):
    if not paths:
        raise StageError("no validation shard (shard_*.parquet) in the tokenizer's last input directory")
    texts = list(iter_texts(paths))
    if not any(texts):
        raise StageError(f"{', '.join(map(str, paths))}: the validation shard holds no text, so compression and "
                         "bits per byte cannot be measured; check the dataset's val_shard (its last shard) and "
                         "fetch it again")
    with ThreadPoolExecutor(max_workers=threads) as pool:  # tiktoken releases the GIL while it encodes
        ntokens = sum(len(ids) for ids in pool.map(lambda t: encode_document(enc, t), texts))
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"val_documents": len(texts), "val_bytes": nbytes, "val_chars": sum(map(len, texts)),
            "val_tokens": ntokens, "bytes_per_token": nbytes / max(ntokens, 1)}


def run(spec, inputs, out, work, threads):
    params = spec["params"]
    *train_dirs, val_dir = inputs
    for d in inputs:
        download.check_intact(d)
    download.one_commit([store.read_manifest(d) for d in inputs], f"tokenizer {spec['key']}")
    train_paths = shard_files(train_dirs)[: params["train_shards"]]
    if not train_paths:
        raise StageError(f"no train shards found in {', '.join(map(str, train_dirs))}")
    started = store.now_iso()
    t0 = time.time()
    chars = [0]

    def counted():
        for text in iter_texts(train_paths, params["max_chars"], params["doc_cap"]):
            chars[0] += len(text)
            yield text

    try:
        ranks = train_bpe(counted(), params["vocab_size"])
    except TooFewMerges:
        if not chars[0]:  # the real cause, rather than "too few merges"
            raise StageError(f"the train shards hold no text: {', '.join(map(str, train_paths))}; check the "
                             "dataset's shards (the download stage's files)") from None
        raise
    train_time = time.time() - t0
    enc = save(work, ranks)
    tb = token_bytes(enc)
    store.write_npy(work / "token_bytes.npy", tb)
    report = compression(enc, shard_files([val_dir]), threads)
    nonzero = tb[tb > 0]
    report.update(train_chars=chars[0], train_shards=[p.name for p in train_paths], train_time_s=train_time,
                  vocab_size=enc.n_vocab, num_special_tokens=len(SPECIAL_TOKENS),
                  token_bytes_min=int(nonzero.min()), token_bytes_max=int(nonzero.max()),
                  token_bytes_mean=float(nonzero.mean()))
    store.write_json(work / "compression.json", report)
    store.seal(spec, FILES, work, out, resolved=report, started_at=started)


def main(argv=None):
    return cli.run_stage("tokenizer", cli.parser("tokenizer", __doc__.splitlines()[0]), run, argv)


if __name__ == "__main__":
    sys.exit(main())
