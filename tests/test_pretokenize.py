import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import WEBTEXT
from pipeline import pretokenize, store, tokenizer


@pytest.fixture(scope="module")
def block(smoke_data):
    return smoke_data["blocks"][0]


def test_every_document_starts_with_bos_and_decodes_back(smoke_data, block):
    enc = tokenizer.load(smoke_data["tokenizer"])
    bos = enc.encode_single_token("<|bos|>")
    texts = pq.read_table(WEBTEXT / "shard_00001.parquet").column("text").to_pylist()
    tokens = np.load(block / "shard_00001.tokens.npy", mmap_mode="r")
    docs = np.load(block / "shard_00001.docs.npy")
    assert tokens.dtype == np.uint16 and docs.dtype == np.int64
    assert len(docs) == len(texts) + 1 and docs[0] == 0 and docs[-1] == len(tokens)
    assert (tokens[docs[:-1]] == bos).all()
    assert (tokens == bos).sum() == len(texts)  # and nowhere else
    for i in (0, 1, 500, len(texts) - 1):
        assert enc.decode(tokens[docs[i] + 1:docs[i + 1]].tolist()) == texts[i]


def test_index_counts_match_the_files(block):
    index = json.loads((block / "index.json").read_text())
    assert [s["name"] for s in index["shards"]] == ["shard_00000", "shard_00001", "shard_00002"]
    for s in index["shards"]:
        assert s["tokens"] == len(np.load(block / f"{s['name']}.tokens.npy", mmap_mode="r"))
        assert s["documents"] == 1024
    assert index["documents"] == 3072 and index["dtype"] == "uint16"


def test_same_input_same_bytes_whatever_the_thread_count(smoke_data, block, tmp_path):
    spec = json.loads((block / "manifest.json").read_text())
    inputs = [smoke_data["root"] / "store" / r for r in spec["inputs"]]
    out1 = tmp_path / "one"
    pretokenize.run(spec, inputs, out1, tmp_path / "w1", threads=1)
    for name, rec in json.loads((out1 / "manifest.json").read_text())["outputs"].items():
        assert rec["sha256"] == store.sha256_file(block / name), name


def test_resumes_shards_finished_before_a_kill(smoke_data, block, tmp_path, monkeypatch):
    spec = json.loads((block / "manifest.json").read_text())
    inputs = [smoke_data["root"] / "store" / r for r in spec["inputs"]]
    work = tmp_path / "work"
    work.mkdir()
    for suffix in ("tokens.npy", "docs.npy"):  # as if killed after the first shard
        (work / f"shard_00000.{suffix}").write_bytes((block / f"shard_00000.{suffix}").read_bytes())
    encoded = []
    real = pretokenize.encode_shard
    monkeypatch.setattr(pretokenize, "encode_shard", lambda enc, path, *a: encoded.append(path.name) or
                        real(enc, path, *a))
    pretokenize.run(spec, inputs, tmp_path / "out", work, threads=2)
    assert encoded == ["shard_00001.parquet", "shard_00002.parquet"]
    assert store.verify(tmp_path / "out") == []


def test_large_vocab_uses_uint32():
    assert pretokenize.token_dtype(65536) == np.uint16
    assert pretokenize.token_dtype(65537) == np.uint32
