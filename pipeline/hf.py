"""hf: a published HuggingFace causal LM and the tokenizer it was trained with, from one place.

A row's `hf_model` names either
  - a folder, as `save_pretrained` leaves it: config.json, the weights, and the tokenizer as
    vocab.json + merges.txt or tokenizer.json; or
  - a hub repo, `openai-community/gpt2-xl`, optionally pinned: `openai-community/gpt2-xl@<commit or tag>`.
A hub repo is fetched once (into huggingface_hub's cache; under torchrun by rank 0 alone) and model and
tokenizer are both read from that snapshot. Offline (`HF_HUB_OFFLINE=1`, or no network) the cache serves
it, or one line says what is missing. `record` says exactly what was evaluated: the commit the name
resolved to, and the sha256 of every file read.

    python -m pipeline.hf fetch openai-community/gpt2-xl   # into the cache now (e.g. on a login node with
                                                           # network), checked; prints what it resolved to
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from pipeline import cli, store
from pipeline.errors import StageError

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
# Safetensors first; PyTorch pickles only for a repo without them (gpt2-xl has both, and TF, Flax, ONNX
# and Rust copies we never want: ~30 GB in all).
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin")
NEEDS = ("needs config.json, the weights (model.safetensors or pytorch_model.bin) and the tokenizer (vocab.json + "
         "merges.txt, or tokenizer.json), as save_pretrained leaves them")


class Source(NamedTuple):
    """Where the model's files are on this machine, and for a hub repo what it resolved to."""
    folder: str
    repo: str | None = None
    revision: str | None = None
    commit: str | None = None


def _hub():
    """huggingface_hub's snapshot_download, its constants and its errors."""
    try:
        from huggingface_hub import constants, errors, snapshot_download
    except ImportError as e:
        raise StageError("a hub hf_model needs huggingface_hub (it comes with transformers): "
                         "pip install -e '.[hf]'") from e
    return snapshot_download, constants, errors


def _first_line(error):
    """An exception's first line (huggingface_hub and transformers write paragraphs), or its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _offline():
    # read at call time (huggingface_hub reads it once, at import)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _has(folder, patterns):
    return any(next(Path(folder).glob(p), None) for p in patterns)


def _fetch(repo, revision):
    """The hub repo's snapshot in the local cache, fetched if need be (only the files a causal LM and its
    tokenizer are loaded from). Every way this can fail is one line."""
    snapshot_download, constants, errors = _hub()
    offline = _offline()
    patterns = [*CONFIG_FILES, *TOKENIZER_FILES]
    where = f"{repo}" + (f"@{revision}" if revision else "")
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=[*patterns, *SAFETENSORS],
                                   local_files_only=offline)
        if not _has(folder, SAFETENSORS):  # an older repo: PyTorch weights, of the same commit
            folder = snapshot_download(repo, revision=Path(folder).name, allow_patterns=[*patterns, *PICKLES],
                                       local_files_only=offline)
    except (errors.LocalEntryNotFoundError, errors.IncompleteSnapshotError) as e:
        why = "HF_HUB_OFFLINE is set" if offline else "huggingface.co cannot be reached"
        raise StageError(f"hf_model {where}: not in the HuggingFace cache ({constants.HF_HUB_CACHE}) and {why}; "
                         "run once with network to cache it, or set hf_model to a folder that holds it (" + NEEDS
                         + ")") from e
    except errors.RevisionNotFoundError as e:
        raise StageError(f"hf_model {where}: the repo has no revision {revision!r}; pin a commit, branch or tag "
                         "it has") from e
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        raise StageError(f"hf_model {where}: no such model repo on the hub, or it needs a token (HF_TOKEN, or "
                         "`hf auth login`); a local folder is also accepted") from e
    except errors.HFValidationError as e:
        raise StageError(f"hf_model {where}: neither a folder on this machine nor a hub repo id (owner/name)") from e
    except (errors.HfHubHTTPError, OSError) as e:
        raise StageError(f"hf_model {where}: fetching it from the hub failed ({_first_line(e)}); retry, or set "
                         "hf_model to a folder that holds it") from e
    # the cache keeps each snapshot under the commit it resolved to
    return Source(folder=str(folder), repo=repo, revision=revision, commit=Path(folder).name)


def no_tokenizer(folder):
    """Why `folder` has no tokenizer to read (None when it has one)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file() or all((folder / f).is_file() for f in ("vocab.json", "merges.txt")):
        return None
    return (f"{folder}: no tokenizer beside the model: it needs vocab.json + merges.txt or tokenizer.json (it has "
            f"{_contents(folder)}); save it with tokenizer.save_pretrained(folder), or name the hub repo that has "
            "both")


def _contents(folder):
    """What a folder holds, for a message: its file names, or "nothing"."""
    return ", ".join(sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []) or "nothing"


def no_model(folder):
    """Why `folder` has no causal LM to load (None when it has config.json and weights)."""
    folder = Path(folder)
    lacks = [what for what, there in (("config.json", (folder / "config.json").is_file()),
                                      ("the weights (model.safetensors or pytorch_model.bin)",
                                       _has(folder, (*SAFETENSORS, *PICKLES))))
             if not there]
    if not lacks:
        return None
    return (f"{folder}: no model to load: it lacks {' and '.join(lacks)} (it has {_contents(folder)}); save it with "
            "model.save_pretrained(folder), or name the hub repo that has it")


def _locate(hf_model, with_tokenizer):
    hf_model = str(hf_model)
    path = Path(hf_model).expanduser()
    repo, _, revision = hf_model.partition("@")
    if path.is_dir():
        source = Source(folder=str(path.resolve()))
    elif path.is_absolute() or hf_model.startswith((".", "~")) or repo.count("/") > 1:
        raise StageError(f"hf_model {hf_model}: no such folder (a folder {NEEDS}; or a hub repo id such as "
                         "openai-community/gpt2-xl)")
    else:
        source = _fetch(repo, revision or None)
    # said here, where a failure is said once, rather than by every rank loading it
    missing = no_model(source.folder) or (with_tokenizer and no_tokenizer(source.folder))
    if missing:
        raise StageError(f"hf_model {hf_model}: {missing}")
    return source


def locate(hf_model, with_tokenizer=True):
    """The Source of `hf_model`, checked to hold a tokenizer unless `with_tokenizer` is False (a model
    scored with another tokenizer). Under torch.distributed rank 0 fetches and tells the others, so a hub
    repo is fetched once and a failure is said once (the other ranks exit quietly with the same status)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _locate(hf_model, with_tokenizer)
    answer = [None]
    if dist.get_rank() == 0:
        try:
            answer = [_locate(hf_model, with_tokenizer)]
        except StageError as e:
            answer = [str(e)]
    dist.broadcast_object_list(answer, src=0)
    (found,) = answer
    if isinstance(found, str):
        if dist.get_rank() == 0:
            raise StageError(found)
        raise SystemExit(2)
    if found.repo and not Path(found.folder).is_dir():  # another node, with its own cache: the same commit
        return _fetch(found.repo, found.commit)._replace(revision=found.revision)
    return found


def record(hf_model, source):
    """What was evaluated, for core.json and the manifest: the hub commit, and each file's sha256 and size."""
    folder = Path(source.folder)
    names = sorted({p.name for pattern in (*CONFIG_FILES, *TOKENIZER_FILES, *SAFETENSORS, *PICKLES)
                    for p in folder.glob(pattern) if p.is_file()})
    out = {"hf_model": hf_model}
    if source.repo:
        out.update(repo=source.repo, revision=source.revision or "main", commit=source.commit)
    else:
        out["folder"] = str(folder)
    out["files"] = {name: store.file_record(folder / name) for name in names}
    return out


class HFTokenizer:
    """The model's own BPE, with the two things the CORE harness asks of a tokenizer: encode_ordinary
    (text -> ids, no special tokens added or recognised, as tiktoken's) and bos."""

    def __init__(self, tokenizer, bos):
        self.tokenizer, self.bos = tokenizer, bos
        # "<|endoftext|>" inside a document is text, as tiktoken's encode_ordinary treats it
        self.tokenizer.encode_special_tokens = True

    def encode_ordinary(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def _read_json(path):
    try:
        return json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    except ValueError as e:
        raise StageError(f"{path}: not valid JSON ({e}); fetch or save the model again") from e


def _bpe(folder):
    """A tokenizers.Tokenizer from tokenizer.json, or GPT-2's byte-level BPE from vocab.json + merges.txt."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError as e:
        raise StageError("a hf_model's tokenizer needs the tokenizers package (it comes with transformers): "
                         "pip install -e '.[hf]'") from e
    try:
        if (folder / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(folder / "tokenizer.json"))
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            # what GPT-2's vocab/merges mean: byte-level pieces split by GPT-2's regex, no prefix space
            # unless the folder's tokenizer_config.json asks for one
            prefix = bool(_read_json(folder / "tokenizer_config.json").get("add_prefix_space", False))
            bpe = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
            bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
            bpe.decoder = decoders.ByteLevel()
            return bpe
    except Exception as e:  # the tokenizers library raises bare Exceptions for malformed files
        raise StageError(f"{folder}: its tokenizer files cannot be read ({e}); fetch or save the model again") from e
    raise StageError(no_tokenizer(folder))


def load_tokenizer(folder):
    """The tokenizer of the model in `folder`. BOS is the model's bos_token_id (config.json), else its
    <|endoftext|>: GPT-2 has no separate BOS and starts documents with <|endoftext|>."""
    folder = Path(folder)
    bpe = _bpe(folder)
    vocab = bpe.get_vocab_size(with_added_tokens=True)
    bos = _read_json(folder / "config.json").get("bos_token_id")
    if bos is None:
        bos = bpe.token_to_id("<|endoftext|>")
    if bos is None:
        raise StageError(f"{folder / 'config.json'}: no bos_token_id, and the tokenizer has no <|endoftext|>; set "
                         "bos_token_id to the token the model starts a document with")
    if not isinstance(bos, int) or not 0 <= bos < vocab:
        raise StageError(f"{folder / 'config.json'}: bos_token_id {bos} is not a token of the tokenizer beside it "
                         f"({vocab} tokens); the model and tokenizer do not belong together")
    return HFTokenizer(bpe, bos)


class HFCausalLM(torch.nn.Module):
    """A HuggingFace causal LM (e.g. openai-community/gpt2-xl's snapshot, or a local folder) behind the same
    call as ours: token ids in, logits out; prompts longer than its positions are cropped."""

    def __init__(self, folder, device):
        super().__init__()
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as e:
            raise StageError("evaluating a HuggingFace model needs transformers: pip install -e '.[hf]'") from e
        try:
            self.model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
        except (OSError, ValueError) as e:
            raise StageError(f"{folder}: not a loadable causal LM ({_first_line(e)}); it {NEEDS}") from e
        config = self.model.config
        self.sequence_len = getattr(config, "n_positions", None) or config.max_position_embeddings

    def forward(self, ids):
        return self.model(ids).logits


@cli.user_errors
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.hf", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    fetch = sub.add_parser("fetch", help="fetch a hub repo's model and tokenizer into the HuggingFace cache (or check "
                                         "a folder); print the commit and files, as the core stage records them")
    fetch.add_argument("hf_model", help="a hub repo (owner/name, or owner/name@revision) or a folder")
    args = ap.parse_args(argv)
    source = locate(args.hf_model)
    load_tokenizer(source.folder)  # readable, with a BOS the model knows
    print(json.dumps(record(args.hf_model, source), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
