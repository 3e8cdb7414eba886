"""Row 0's path, offline: a published HuggingFace model and the tokenizer beside it (pipeline.hf), from a
folder or the hub's cache, through `snakemake results/<row>/core.json reports/leaderboard.md`.

The model is a tiny random GPT-2 with its own small byte-level BPE, trained here on a few KB of the
shipped web text and saved by transformers at test time: nothing big is vendored."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from helpers import ENV, REPO, WEBTEXT, snakemake_cmd, write_config
from pipeline import hf, launch, plan, store
from pipeline.errors import StageError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

EOT = "<|endoftext|>"
# what the tokenizer is checked on: prose, digits, leading and repeated spaces, newlines, non-ASCII,
# and GPT-2's special token as plain text (encode_ordinary: no special tokens recognised)
SAMPLES = ["The quick brown fox jumps over the lazy dog.", "  two leading spaces, 12345 digits\n\nand\ttabs",
           "naïve café — “quotes” and emoji 🙂", "Question: what is 7 * 6?\nAnswer: 42", f"a{EOT}b"]


def webtext(chars=6000):
    """A few KB of real text from the shipped shards."""
    docs = pq.read_table(WEBTEXT / "shard_00000.parquet", columns=["text"]).column("text").to_pylist()
    out, n = [], 0
    for doc in docs:
        out.append(doc)
        n += len(doc)
        if n >= chars:
            return out
    return out


def train_bpe(vocab_size=384):
    """GPT-2's kind of tokenizer at toy size: byte-level BPE, GPT-2's split regex, <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(webtext(), trainer=trainer)
    return bpe


def save_tiny_gpt2(folder, tokenizer_files="tokenizer.json", n_positions=128, bos=None):
    """A random 2-layer GPT-2 and its BPE in `folder`, as save_pretrained leaves them. tokenizer_files:
    "tokenizer.json" (transformers' save), "vocab+merges" (GPT-2's original two files) or "none"."""
    import torch
    bpe = train_bpe()
    eot = bpe.token_to_id(EOT)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=n_positions, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=eot if bos is None else bos, eos_token_id=eot)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    if tokenizer_files == "tokenizer.json":
        wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOT, eos_token=EOT,
                                                       unk_token=EOT)
        wrapped.save_pretrained(folder)
    elif tokenizer_files == "vocab+merges":
        bpe.model.save(str(folder))  # vocab.json and merges.txt
    return Path(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny GPT-2 per tokenizer layout (the same weights and BPE: both are seeded/deterministic)."""
    root = tmp_path_factory.mktemp("tiny-gpt2")
    return {layout: save_tiny_gpt2(root / layout, layout) for layout in ("tokenizer.json", "vocab+merges", "none")}


# ----------------------------------------------------------------------------- the tokenizer beside the model

@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab+merges"])
def test_the_tokenizer_beside_the_model_gives_transformers_ids(tiny, layout):
    folder = tiny[layout]
    assert {p.name for p in folder.iterdir()} >= ({"tokenizer.json"} if layout == "tokenizer.json"
                                                  else {"vocab.json", "merges.txt"})
    ours = hf.load_tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in [*SAMPLES[:-1], webtext(1)[0][:2000]]:
        ids = ours.encode_ordinary(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        assert theirs.decode(ids) == text  # byte-level: nothing lost
    # GPT-2's convention: no separate BOS, documents start with <|endoftext|>, the model's bos_token_id
    config = json.loads((folder / "config.json").read_text())
    assert ours.bos == config["bos_token_id"] == theirs.convert_tokens_to_ids(EOT)
    # a "<|endoftext|>" inside a document is text, as tiktoken's encode_ordinary has it
    assert ours.bos not in ours.encode_ordinary(SAMPLES[-1])
    assert len(ours.encode_ordinary(SAMPLES[-1])) > 3


def test_both_layouts_tokenize_alike(tiny):
    a, b = (hf.load_tokenizer(tiny[layout]) for layout in ("tokenizer.json", "vocab+merges"))
    text = " ".join(SAMPLES[:-1])
    assert a.encode_ordinary(text) == b.encode_ordinary(text) and a.bos == b.bos


def test_a_model_without_its_tokenizer_is_one_line(tiny, capsys):
    for look in (hf.load_tokenizer, hf.locate):  # loading it, and finding the model (what the stage does first)
        with pytest.raises(StageError) as e:
            look(tiny["none"])
        message = str(e.value)
        assert "\n" not in message
        assert str(tiny["none"]) in message and "vocab.json + merges.txt or tokenizer.json" in message
        assert "config.json" in message  # what the folder does have
    assert hf.locate(tiny["none"], with_tokenizer=False).folder == str(tiny["none"])  # scored with another one
    assert hf.main(["fetch", str(tiny["none"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: hf_model") and "\n" not in err


@pytest.mark.bad_input
@pytest.mark.parametrize("remove", [("model.safetensors",), ("config.json",), ("config.json", "model.safetensors")])
def test_a_folder_without_its_weights_or_config_is_one_line(tiny, tmp_path, capsys, remove):
    """Found before torchrun starts (hf fetch runs first in the core job), not by every rank loading it."""
    folder = tmp_path / "partial"
    shutil.copytree(tiny["vocab+merges"], folder)
    for name in remove:
        (folder / name).unlink()
    with pytest.raises(StageError) as e:
        hf.locate(folder, with_tokenizer=False)
    message = str(e.value)
    assert "\n" not in message and str(folder) in message and "no model to load" in message
    assert ("config.json" in message.split("(it has")[0]) == ("config.json" in remove)
    assert ("the weights" in message) == ("model.safetensors" in remove)
    assert hf.main(["fetch", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: hf_model") and "\n" not in err and "no model to load" in err


def test_fetch_prints_what_the_core_stage_records(tiny, capsys):
    folder = tiny["vocab+merges"]
    assert hf.main(["fetch", str(folder)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == hf.record(str(folder), hf.locate(str(folder)))
    assert printed["folder"] == str(folder.resolve())
    assert set(printed["files"]) == {"config.json", "generation_config.json", "model.safetensors", "vocab.json",
                                     "merges.txt"}


def test_a_bos_the_tokenizer_does_not_have_is_refused(tmp_path):
    folder = save_tiny_gpt2(tmp_path / "m", bos=50256)  # GPT-2's id, in a 384-token tokenizer
    with pytest.raises(StageError, match=r"config\.json: bos_token_id 50256 is not a token"):
        hf.load_tokenizer(folder)


def test_model_source_takes_model_and_tokenizer_from_one_folder(tiny):
    import torch

    from pipeline import core
    model, encode, bos, max_len, enc = core.model_source(hf_source=hf.locate(str(tiny["tokenizer.json"])),
                                                         device=torch.device("cpu"))
    assert enc is None and max_len == 128 and bos == hf.load_tokenizer(tiny["tokenizer.json"]).bos
    assert encode(SAMPLES[0]) == hf.load_tokenizer(tiny["tokenizer.json"]).encode_ordinary(SAMPLES[0])
    assert model(torch.tensor([[bos, *encode(SAMPLES[0])]])).shape[-1] == 384


# ----------------------------------------------------------------------------- a hub repo, from the cache only

def fake_hub_cache(cache, repo, commit, folder):
    """huggingface_hub's cache layout: refs/main names the commit, snapshots/<commit>/ holds the files."""
    root = Path(cache) / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in Path(folder).iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_repo_not_in_the_cache_offline_is_one_line(offline_hub):
    with pytest.raises(StageError) as e:
        hf.locate("nobody/not-cached")
    message = str(e.value)
    assert "\n" not in message
    assert "nobody/not-cached" in message and str(offline_hub) in message and "HF_HUB_OFFLINE is set" in message


def test_a_cached_hub_repo_is_read_offline_and_its_commit_recorded(offline_hub, tiny):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = fake_hub_cache(offline_hub, "tiny/gpt2", commit, tiny["vocab+merges"])
    source = hf.locate("tiny/gpt2")
    assert Path(source.folder) == snapshot and source.commit == commit and source.repo == "tiny/gpt2"
    assert hf.locate(f"tiny/gpt2@{commit}").folder == source.folder  # pinned to the commit it resolved to
    rec = hf.record("tiny/gpt2", source)
    assert rec["commit"] == commit and rec["revision"] == "main" and "folder" not in rec
    assert rec["files"]["merges.txt"]["sha256"] == store.sha256_file(tiny["vocab+merges"] / "merges.txt")
    assert {"config.json", "model.safetensors", "vocab.json"} <= set(rec["files"])
    assert hf.load_tokenizer(source.folder).encode_ordinary(SAMPLES[0]) == hf.load_tokenizer(
        tiny["vocab+merges"]).encode_ordinary(SAMPLES[0])


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(StageError, match=r"no such folder"):
        hf.locate(str(tmp_path / "absent"))


def test_a_missing_model_is_one_line_in_the_jobs_log(tmp_path):
    """The core rule's command for a HuggingFace row on 2 ranks, offline, with the model nowhere: the log is
    our one line, neither one per rank nor followed by torchrun's traceback."""
    pytest.importorskip("huggingface_hub")
    env = {**ENV, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache"),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    spec = plan.make_spec("core", {"hf_model": "nobody/not-cached", "max_per_task": 4, "allow_missing_tasks": True},
                          ["bundle/0000000000000000"], settings={"launch": {"nproc_per_node": 2, "nodes": 1}})
    command = launch.core_command(spec, [str(tmp_path / "bundle")], tmp_path / "out", tmp_path / "work")
    log = tmp_path / "core.log"
    out = subprocess.run(f"{command} > {log} 2>&1", shell=True, env=env, timeout=300)
    assert out.returncode == 2
    (line,) = log.read_text().splitlines()
    assert line.startswith(f"error: hf_model nobody/not-cached: not in the HuggingFace cache ({tmp_path}")
    assert "HF_HUB_OFFLINE is set" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


# ----------------------------------------------------------------------------- the row, end to end

@pytest.mark.slow
def test_a_hf_model_row_runs_to_core_and_onto_the_page(tmp_path):
    folder = save_tiny_gpt2(tmp_path / "tiny-gpt2")
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    # two ranks: the folder is looked up once and the items split between them
    cfg["rows"]["tiny_gpt2"] = {"description": "a tiny random GPT-2 (test)", "hf_model": str(folder),
                                "launch": {"nproc_per_node": 2},
                                "core": {"bundle": "core_mini", "max_per_task": 4, "allow_missing_tasks": True,
                                         "batch_tokens": 2048}}
    write_config(tmp_path, cfg)
    # HF_HUB_OFFLINE: nothing here may reach the network; ./: the page waits for the row however it is named
    run = subprocess.run(snakemake_cmd(tmp_path, "./results/tiny_gpt2/core.json", "reports/leaderboard.md"),
                         capture_output=True, text=True, timeout=600, env={**ENV, "HF_HUB_OFFLINE": "1"})
    logs = "".join(p.read_text() for p in tmp_path.glob("results/logs/**/*.log"))
    assert run.returncode == 0, (run.stderr + logs)[-4000:]

    core = json.loads((tmp_path / "results" / "tiny_gpt2" / "core.json").read_text())
    assert core["tasks_evaluated"] == 18 and core["partial"] and not core["comparable_to_gpt2"]
    assert all(t["items"] == 4 for t in core["tasks"].values()) and core["world_size"] == 2
    assert core["hf_model"] == str(folder)
    files = core["hf_source"]["files"]
    assert files["tokenizer.json"]["sha256"] == store.sha256_file(folder / "tokenizer.json")
    assert files["model.safetensors"]["sha256"] == store.sha256_file(folder / "model.safetensors")

    chain = json.loads((tmp_path / "results" / "tiny_gpt2" / "manifest.json").read_text())["chain"]
    assert set(chain) == {"bundle", "core"}  # evaluated only: nothing downloaded, tokenized or trained
    assert chain["core"]["resolved"]["hf_source"] == core["hf_source"]
    assert chain["core"]["outputs"]["core.json"]["sha256"] == store.sha256_file(
        tmp_path / "results" / "tiny_gpt2" / "core.json")

    board = (tmp_path / "reports" / "leaderboard.md").read_text()
    line = next(x for x in board.splitlines() if "row `tiny_gpt2`" in x)
    assert f"{core['core_metric']:.4f} (partial: 18 tasks)" in line and "a tiny random GPT-2 (test)" in line
    with open(tmp_path / "reports" / "leaderboard.csv") as f:
        rows = [r for r in csv.reader(f) if any("tiny_gpt2" in cell for cell in r)]
    assert rows and any(f"{core['core_metric']:.4f}" in cell for r in rows for cell in r)
