"""Bad input, refused with a message that names the file, row or field and says what would fix it
(or handled, where the pipeline can): config rows and flags, parquet shards, CORE bundles."""

import copy
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from helpers import CORE_MINI, WEBTEXT
from pipeline import bundle, config, core_tasks, download, plan, pretokenize, store, tokenizer, train
from pipeline.core_tasks import Task
from pipeline.errors import StageError

pytestmark = pytest.mark.bad_input


def one_error_line(capsys, rc):
    """What a user sees of a refused command: exit status 2 and an `error:` line, no traceback."""
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err[err.index("error: "):]


# ----------------------------------------------------------------------------- config and flags

@pytest.fixture
def config_file(smoke_config, tmp_path):
    def write(edit=lambda c: None):
        cfg = copy.deepcopy(smoke_config)
        edit(cfg)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)
    return write


def test_unknown_row_lists_the_rows(config_file, capsys):
    msg = one_error_line(capsys, pretokenize.main(["--row", "d26", "--config", config_file()]))
    assert "no row named 'd26'" in msg and "d26_fp8" in msg and "smoke" in msg


def test_unknown_dataset_on_the_command_line_lists_the_datasets(config_file, capsys):
    msg = one_error_line(capsys, download.main(["--dataset", "fineweb", "--shards", "0", "--config", config_file()]))
    assert "no dataset named 'fineweb'" in msg and "climbmix" in msg


@pytest.mark.parametrize("shards, what", [
    ("5-9", "dataset 'webtext' has shards 0..6 (6 is the validation shard); shard 9 is past its end"),
    ("0-x", "'0-x' is not a shard index or a range like 0-9"),
    ("5-3", "names no shard; give a range like 0-9 (low end first)"),
])
def test_bad_shard_range_on_the_command_line(config_file, capsys, tmp_path, shards, what):
    rc = download.main(["--dataset", "webtext", "--shards", shards, "--config", config_file(),
                        "--store", str(tmp_path / "s")])
    assert what in one_error_line(capsys, rc)
    assert not (tmp_path / "s").exists()


def test_an_invalid_config_file_is_one_error_naming_row_and_field(config_file, capsys):
    path = config_file(lambda c: c["rows"]["smoke"]["train"].update(depth=3))
    msg = one_error_line(capsys, download.main(["--row", "smoke", "--config", path]))
    assert msg.startswith(f"error: {path} is not valid")
    assert "rows.smoke.train.depth: 3 is not a multiple of 2" in msg


def test_tokenizer_reading_past_the_datasets_train_shards(repo_config):
    cfg = copy.deepcopy(repo_config)
    cfg["tokenizers"]["webtext_4k"]["train_shards"] = 7
    with pytest.raises(config.ConfigError) as err:
        config.check(cfg, source="my.yaml")
    assert "tokenizers.webtext_4k.train_shards: 7 is past the end of dataset 'webtext', which has 6 train shards" \
        in str(err.value)


def test_device_batch_that_does_not_divide_the_auto_sized_batch():
    # total_batch_size -1 is sized by the train stage, which checks it once it knows the size
    args = train.parse_args(["--depth=2", "--max-seq-len=64", "--device-batch-size=3"])
    with pytest.raises(StageError, match="is not a multiple of device_batch_size x max_seq_len x world size = 192"):
        train.resolve(args, 512, 1)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A 300-token tokenizer directory, sealed like the tokenizer stage's (trained in milliseconds)."""
    src, out = tmp_path_factory.mktemp("toksrc"), tmp_path_factory.mktemp("tok") / "t"
    texts = tokenizer.iter_texts([WEBTEXT / "shard_00000.parquet"], max_chars=100_000)
    enc = tokenizer.save(src, tokenizer.train_bpe(texts, 300))
    store.write_npy(src / "token_bytes.npy", tokenizer.token_bytes(enc))
    files = ["tokenizer.tiktoken", "tokenizer.json", "token_bytes.npy"]
    store.seal(plan.make_spec("tokenizer", {"vocab_size": 300}), files, src, out)
    return out


def fp8_trainer(tiny_tokenizer, tmp_path, monkeypatch, *flags):
    # a device without fp8 (an A100, say), wherever the test runs
    monkeypatch.setattr(train, "fp8_supported", lambda device: False)
    # the loader comes after the fp8 decision; these tests stop at the decision
    monkeypatch.setattr(train, "DistributedLoader", lambda *a, **k: None)
    args = train.parse_args(["--depth=2", "--max-seq-len=64", "--device-batch-size=2", "--total-batch-size=128",
                             "--device-type=cpu", "--fp8", *flags])
    return train.Trainer(args, {"params": {}}, [tiny_tokenizer, tmp_path, tmp_path], tmp_path / "o", tmp_path / "w")


def test_fp8_on_a_device_without_fp8_is_refused(tiny_tokenizer, tmp_path, monkeypatch):
    with pytest.raises(StageError) as err:
        fp8_trainer(tiny_tokenizer, tmp_path, monkeypatch).build()
    assert "--fp8 needs an fp8-capable device" in str(err.value)
    assert "Drop --fp8, or add --fp8-fallback" in str(err.value)


def test_fp8_falls_back_to_bf16_only_when_the_row_says_so(tiny_tokenizer, tmp_path, monkeypatch, capsys):
    trainer = fp8_trainer(tiny_tokenizer, tmp_path, monkeypatch, "--fp8-fallback")
    trainer.build()
    assert trainer.fp8_layers == {"converted": [], "skipped": []}
    assert not any(type(m).__name__ == "Float8Linear" for m in trainer.model.modules())
    assert "no fp8 support; training in bf16 (--fp8-fallback)" in capsys.readouterr().err


def test_fp8_fallback_is_a_row_field(repo_config):
    cfg = copy.deepcopy(repo_config)
    cfg["rows"]["d26_fp8"]["train"]["fp8_fallback"] = "yes"
    with pytest.raises(config.ConfigError, match=r"rows.d26_fp8.train.fp8_fallback: 'yes' is not of type 'boolean'"):
        config.check(cfg)
    cfg["rows"]["d26_fp8"]["train"]["fp8_fallback"] = True
    assert config.check(cfg)["rows"]["d26_fp8"]["train"]["fp8_fallback"] is True


def test_too_little_text_for_the_vocab_size_is_refused():
    # rustbpe stops when no pair repeats: without the check the vocabulary would silently be smaller
    with pytest.raises(StageError, match="only .* of the 3831 merges that vocab_size 4096 needs; give the tokenizer "
                                         "more text"):
        tokenizer.train_bpe(iter(["hello world, hello there"] * 3), 4096)


# ----------------------------------------------------------------------------- bad shards

def write_shard(directory, name, table=None, raw=None):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        pq.write_table(table, path)
    return path


def texts(*docs):
    return pa.table({"text": pa.array(list(docs), pa.string())})


BAD_UTF8 = pa.table({"text": pa.array([b"fine", b"caf\xe9 in latin-1", b"\xff\xfe binary"], pa.binary())
                     .view(pa.string())})  # a string column whose bytes are not UTF-8
BAD_SHARDS = {
    "no_text_column": (pa.table({"content": ["a document"]}), None, "no 'text' column (columns: content)"),
    "binary_column": (pa.table({"text": pa.array([b"a document"], pa.binary())}), None,
                      "the 'text' column holds binary, not strings"),
    "invalid_utf8": (BAD_UTF8, None, "not valid UTF-8"),
    "zero_bytes": (None, b"", "Parquet file size is 0 bytes"),
    "truncated": (None, (WEBTEXT / "shard_00000.parquet").read_bytes()[:3000], "not a parquet file"),
}

# verification opens the file itself; pyarrow's words for a cut file are what it says then
DOWNLOAD_SAYS = {"truncated": "Parquet magic bytes not found in footer"}


def sealed_block(directory, shards):
    """A download store directory holding `shards` ({name: table or bytes}), with its manifest."""
    src = directory.with_name(directory.name + "_src")
    for name, content in shards.items():
        write_shard(src, name, **({"raw": content} if isinstance(content, bytes) else {"table": content}))
    store.seal(plan.make_spec("download", {"shards": sorted(shards)}), sorted(shards), src, directory)
    return directory


@pytest.mark.parametrize("kind", sorted(BAD_SHARDS))
def test_download_refuses_a_bad_shard_at_once_naming_it(tmp_path, kind):
    table, raw, what = BAD_SHARDS[kind]
    source = tmp_path / "mirror"
    write_shard(source, "shard_00000.parquet", table, raw)
    url = str(source / "shard_00000.parquet")
    with pytest.raises(StageError) as err:
        # a local file does not change between attempts, so there is no point in waiting for it
        download.fetch_shard(url, tmp_path / "shard_00000.parquet", attempts=5, backoff_s=30)
    msg = str(err.value)
    assert msg.startswith(f"{url}: failed after 1 attempt: not a valid nanochat shard")
    assert DOWNLOAD_SAYS.get(kind, what) in msg
    assert "check that the dataset's base_url serves nanochat-format parquet shards" in msg
    assert not (tmp_path / "shard_00000.parquet").exists()


@pytest.mark.parametrize("kind", sorted(BAD_SHARDS))
def test_pretokenize_names_a_bad_shard_and_the_fix(tiny_tokenizer, tmp_path, capsys, kind):
    table, raw, what = BAD_SHARDS[kind]
    block = sealed_block(tmp_path / "block", {"shard_00000.parquet": texts("good"),
                                              "shard_00001.parquet": raw if raw is not None else table})
    spec = plan.make_spec("pretokenize", {"x": kind}, ["tokenizer/t", "download/d"])
    argv = ["--spec", json.dumps(spec), "--inputs", str(tiny_tokenizer), str(block), "--out", str(tmp_path / "o"),
            "--work", str(tmp_path / "w")]
    msg = one_error_line(capsys, pretokenize.main(argv))
    assert msg.startswith(f"error: {block / 'shard_00001.parquet'}: ")
    assert what in msg
    assert "python -m pipeline.download --repair" in msg
    assert not (tmp_path / "o" / "manifest.json").exists()


@pytest.mark.parametrize("kind", ["no_text_column", "invalid_utf8", "zero_bytes"])
def test_tokenizer_names_a_bad_train_shard(tmp_path, kind):
    table, raw, what = BAD_SHARDS[kind]
    train_dir = sealed_block(tmp_path / "train", {"shard_00000.parquet": raw if raw is not None else table})
    val_dir = sealed_block(tmp_path / "val", {"shard_00006.parquet": texts("validation text")})
    spec = plan.make_spec("tokenizer", {"vocab_size": 300, "max_chars": 10_000, "doc_cap": 100, "train_shards": 1})
    with pytest.raises(StageError) as err:
        tokenizer.run(spec, [train_dir, val_dir], tmp_path / "o", tmp_path / "w", 1)
    assert str(err.value).startswith(f"{train_dir / 'shard_00000.parquet'}: ") and what in str(err.value)


def test_an_empty_shard_is_fine_but_a_block_of_only_empty_shards_is_refused(tiny_tokenizer, tmp_path):
    empty = texts()
    block = sealed_block(tmp_path / "block", {"shard_00000.parquet": texts("one doc", "two docs"),
                                              "shard_00001.parquet": empty})
    assert download.verify_shard(block / "shard_00001.parquet")["num_rows"] == 0  # valid, just empty
    spec = plan.make_spec("pretokenize", {"x": 1})
    pretokenize.run(spec, [tiny_tokenizer, block], tmp_path / "o", tmp_path / "w", 1)
    index = json.loads((tmp_path / "o" / "index.json").read_text())
    assert [s["documents"] for s in index["shards"]] == [2, 0]
    assert len(np.load(tmp_path / "o" / "shard_00001.docs.npy")) == 1  # offsets [0]: no documents
    only_empty = sealed_block(tmp_path / "empty", {"shard_00000.parquet": empty, "shard_00001.parquet": empty})
    with pytest.raises(StageError, match=f"{only_empty}: every shard is empty .*--repair"):
        pretokenize.run(spec, [tiny_tokenizer, only_empty], tmp_path / "o2", tmp_path / "w2", 1)
    assert not (tmp_path / "o2" / "manifest.json").exists()


def test_empty_validation_shard_is_refused_naming_it(tmp_path):
    train_dir = sealed_block(tmp_path / "train", {"shard_00000.parquet": pq.read_table(WEBTEXT / "shard_00000.parquet")
                                                  .slice(0, 200)})
    val_dir = sealed_block(tmp_path / "val", {"shard_00006.parquet": texts()})
    spec = plan.make_spec("tokenizer", {"vocab_size": 300, "max_chars": 100_000, "doc_cap": 1000, "train_shards": 1})
    with pytest.raises(StageError) as err:
        tokenizer.run(spec, [train_dir, val_dir], tmp_path / "o", tmp_path / "w", 1)
    assert str(err.value).startswith(f"{val_dir / 'shard_00006.parquet'}: the validation shard holds no text")
    assert "val_shard" in str(err.value)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_train_shards_without_any_text_are_refused(tmp_path):
    train_dir = sealed_block(tmp_path / "train", {"shard_00000.parquet": texts("", "")})
    val_dir = sealed_block(tmp_path / "val", {"shard_00006.parquet": texts("validation text")})
    spec = plan.make_spec("tokenizer", {"vocab_size": 300, "max_chars": 100, "doc_cap": 100, "train_shards": 1})
    with pytest.raises(StageError, match="the train shards hold no text: .*shard_00000.parquet"):
        tokenizer.run(spec, [train_dir, val_dir], tmp_path / "o", tmp_path / "w", 1)


def multi_mb_docs():
    prose = " ".join(tokenizer.read_texts(WEBTEXT / "shard_00006.parquet"))
    big = (prose * (3_000_000 // len(prose) + 1))[:3_000_000]                  # 3 MB of real text
    spaced = "a table:" + " " * 1_500_000 + "end of it"  # a run of spaces tiktoken's regex gives up on
    return [big, "a short one", spaced]


def test_multi_megabyte_documents_are_pretokenized_whole(tiny_tokenizer, tmp_path):
    docs = multi_mb_docs()
    block = sealed_block(tmp_path / "block", {"shard_00000.parquet": texts(*docs)})
    pretokenize.run(plan.make_spec("pretokenize", {"x": 2}), [tiny_tokenizer, block], tmp_path / "o",
                    tmp_path / "w", 2)
    enc = tokenizer.load(tiny_tokenizer)
    tokens = np.load(tmp_path / "o" / "shard_00000.tokens.npy")
    offsets = np.load(tmp_path / "o" / "shard_00000.docs.npy")
    assert len(offsets) == 4
    for i, doc in enumerate(docs):  # every document, BOS first, decodes back to exactly its text
        ids = tokens[offsets[i]:offsets[i + 1]].tolist()
        assert ids[0] == enc.encode_single_token(tokenizer.BOS)
        assert enc.decode(ids[1:]) == doc
    # a document without such runs is encoded in one piece, exactly as tiktoken does it
    assert tokens[offsets[0] + 1:offsets[1]].tolist() == enc.encode_ordinary(docs[0])


def test_multi_megabyte_documents_are_cropped_to_doc_cap_for_tokenizer_training(tmp_path):
    docs = multi_mb_docs()
    train_dir = sealed_block(tmp_path / "train", {"shard_00000.parquet": texts(*docs)})
    val_dir = sealed_block(tmp_path / "val", {"shard_00006.parquet": texts(*docs)})
    spec = plan.make_spec("tokenizer", {"vocab_size": 300, "max_chars": 10**9, "doc_cap": 10_000, "train_shards": 1})
    tokenizer.run(spec, [train_dir, val_dir], tmp_path / "o", tmp_path / "w", 2)
    report = json.loads((tmp_path / "o" / "compression.json").read_text())
    assert report["train_chars"] == 10_000 + len(docs[1]) + 10_000  # each cropped to doc_cap
    assert report["val_chars"] == sum(map(len, docs))                # compression measures the whole documents
    assert report["val_tokens"] > 0


# ----------------------------------------------------------------------------- CORE bundle

@pytest.fixture
def mini(tmp_path):
    import shutil
    shutil.copytree(CORE_MINI, tmp_path / "bundle")
    return tmp_path / "bundle"


def arc(mini):
    return next(t for t in core_tasks.load_tasks(mini) if t.label == "arc_easy")


@pytest.mark.parametrize("line, message", [
    ('{"query": "q", "choices": ["a", "b"], "gold": -1}', "gold -1 is not an index into its 2 options"),
    ('{"query": "q", "choices": ["a", "b"], "gold": true}', "gold True is not an index into its 2 options"),
    ('{"query": "q", "choices": ["a", "b"], "gold": "1"}', "gold '1' is not an index into its 2 options"),
    ('{"query": "q", "choices": "a or b", "gold": 0}', "choices must be a list"),
    ('["q", ["a", "b"], 0]',
     "a multiple_choice item is a JSON object with query, choices, gold; this line holds a list"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 0', "not valid JSON"),
])
def test_bad_task_line_names_file_and_line(mini, line, message):
    path = mini / "eval_data" / "world_knowledge" / "arc_easy.jsonl"
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(StageError) as err:
        core_tasks.load_items(arc(mini))
    assert str(err.value).startswith(f"{path}:41: {message}")


def test_missing_task_file_is_named(mini):
    (mini / "eval_data" / "world_knowledge" / "arc_easy.jsonl").unlink()
    with pytest.raises(StageError, match="arc_easy.jsonl: task file of 'arc_easy' is missing from the bundle"):
        core_tasks.load_items(arc(mini))


def test_task_file_that_is_not_utf8_or_empty(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"query": "caf\xe9", "choices": ["a"], "gold": 0}\n')
    with pytest.raises(StageError, match=r"t.jsonl: not UTF-8 text \(invalid continuation byte at byte 14\)"):
        core_tasks.load_items(Task("t", "multiple_choice", path, 0, " ", 25.0))
    path.write_text("\n\n")
    with pytest.raises(StageError, match="t.jsonl: no items"):
        core_tasks.load_items(Task("t", "multiple_choice", path, 0, " ", 25.0))


def test_core_yaml_entry_without_a_task_file_or_with_an_unknown_type(mini):
    spec = yaml.safe_load((mini / "core.yaml").read_text())
    spec["icl_tasks"][2].pop("dataset_uri")
    (mini / "core.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(StageError, match="core.yaml: icl_tasks entry #3 needs a label, an icl_task_type and a "
                                         "dataset_uri"):
        core_tasks.load_tasks(mini)
    spec["icl_tasks"][2]["dataset_uri"] = "x.jsonl"
    spec["icl_tasks"][2]["icl_task_type"] = "generation"
    (mini / "core.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(StageError, match="has unknown icl_task_type 'generation' .known: multiple_choice, schema"):
        core_tasks.load_tasks(mini)


def test_bundle_without_core_yaml_says_what_a_bundle_is(mini, tmp_path, capsys):
    (mini / "core.yaml").unlink()
    spec = plan.make_spec("bundle", {"url": str(mini)})
    argv = ["--spec", json.dumps(spec), "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")]
    msg = one_error_line(capsys, bundle.main(argv))
    assert f"no core.yaml in the eval bundle unpacked at {mini}" in msg and "eval_meta_data.csv" in msg
    assert not (tmp_path / "o").exists()
