import json
import re

import numpy as np
import pytest

from helpers import WEBTEXT
from pipeline import evaluate, tokenizer
from pipeline.errors import StageError


@pytest.fixture(scope="module")
def enc(smoke_data):
    return tokenizer.load(smoke_data["tokenizer"])


@pytest.fixture(scope="module")
def val_texts():
    return list(tokenizer.iter_texts([WEBTEXT / "shard_00006.parquet"]))


def test_round_trip_on_real_text_including_non_ascii(enc, val_texts):
    non_ascii = [t for t in val_texts if any(ord(c) > 127 for c in t)]
    assert len(non_ascii) > 10  # the fixture really has some
    for text in val_texts[:200] + non_ascii + ["naïve café, 東京 — 12345 ½ \u200b emoji 🦀\r\n\tend"]:
        assert enc.decode(enc.encode_ordinary(text)) == text


def test_special_tokens_follow_the_merges(enc, smoke_data):
    meta = json.loads((smoke_data["tokenizer"] / "tokenizer.json").read_text())
    assert enc.n_vocab == meta["vocab_size"] == 4096
    specials = meta["special_tokens"]
    assert sorted(specials, key=specials.get) == list(tokenizer.SPECIAL_TOKENS)  # ids in nanochat's order
    assert sorted(meta["special_tokens"].values()) == list(range(4096 - 9, 4096))
    assert enc.encode_single_token("<|bos|>") == 4096 - 9
    # a document containing the text of a special token is still encoded as ordinary text
    assert enc.encode_single_token("<|bos|>") not in enc.encode_ordinary("<|bos|>")


def test_numbers_split_into_at_most_two_digits(enc):
    digit_tokens = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab - 9)]
    assert max(len(t) for t in digit_tokens if t.isdigit()) == 2
    pieces = [enc.decode_single_token_bytes(t) for t in enc.encode_ordinary("year 2026: 1234567")]
    assert all(len(p) <= 2 for p in pieces if p.strip().isdigit())
    assert re.search(r"\\p\{N\}\{1,2\}", tokenizer.SPLIT_PATTERN)


def test_token_bytes_count_utf8_bytes_and_zero_for_specials(enc, smoke_data, val_texts):
    tb = np.load(smoke_data["tokenizer"] / "token_bytes.npy")
    assert tb.dtype == np.int32 and len(tb) == enc.n_vocab
    assert (tb[-9:] == 0).all() and (tb[:-9] >= 1).all()
    text = val_texts[3]
    assert tb[enc.encode_ordinary(text)].sum() == len(text.encode("utf-8"))


def test_recipes_before_master_count_bytes_after_a_decode_round_trip(enc, smoke_data):
    """Until nanochat 2ce972a, bytes per token came from decoding each token alone: a token that is not
    valid UTF-8 by itself (every byte >= 0x80 among the 256 base tokens, at least) counted as U+FFFD's 3."""
    raw = evaluate.token_bytes(enc, smoke_data["tokenizer"], "raw").numpy()
    decoded = evaluate.token_bytes(enc, smoke_data["tokenizer"], "decoded").numpy()
    assert np.array_equal(raw, np.load(smoke_data["tokenizer"] / "token_bytes.npy"))
    differ = np.flatnonzero(raw != decoded)
    assert len(differ) >= 128 and (decoded[-9:] == 0).all()
    for i in differ[:50]:
        assert decoded[i] == len(enc.decode([int(i)]).encode("utf-8")) != len(enc.decode_single_token_bytes(int(i)))


def test_compression_report_is_measured_on_the_validation_shard(smoke_data, enc, val_texts):
    report = json.loads((smoke_data["tokenizer"] / "compression.json").read_text())
    assert report["val_documents"] == len(val_texts) == 347
    assert report["val_tokens"] == sum(len(enc.encode_ordinary(t)) for t in val_texts)
    assert report["bytes_per_token"] == pytest.approx(report["val_bytes"] / report["val_tokens"])
    assert 2.5 < report["bytes_per_token"] < 6  # a 4K vocab on English web text
    assert report["train_chars"] >= 8_000_000 and report["train_shards"][0] == "shard_00000.parquet"


def test_training_reads_only_max_chars_cropped_to_doc_cap():
    texts = list(tokenizer.iter_texts([WEBTEXT / "shard_00000.parquet"], max_chars=100_000, doc_cap=500))
    assert all(len(t) <= 500 for t in texts)
    assert 100_000 <= sum(map(len, texts)) < 100_500


@pytest.mark.bad_input
def test_training_is_deterministic_and_refuses_a_tiny_vocab():
    texts = list(tokenizer.iter_texts([WEBTEXT / "shard_00000.parquet"], max_chars=300_000))
    assert tokenizer.train_bpe(iter(texts), 600) == tokenizer.train_bpe(iter(texts), 600)
    with pytest.raises(StageError, match="special tokens"):
        tokenizer.train_bpe(iter(texts), 260)


@pytest.mark.bad_input
def test_a_damaged_tokenizer_directory_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(StageError, match=str(tmp_path)):
        tokenizer.load(tmp_path)
