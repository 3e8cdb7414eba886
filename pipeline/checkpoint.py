"""Training checkpoints: one directory per step, complete or absent.

    <dir>/step_000123/model.pt       fp32 master weights (state dict)
                      optim.pt       optimizer state (identical on every rank, so rank 0 writes it)
                      meta.json      step, loader position, loop state, RNG, model config, flags

A checkpoint is written as `step_N.tmp-<pid>/` and renamed into place, so a kill never leaves a
half-written `step_N/`; the newest complete one is what a rerun resumes from.
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch

from pipeline.store import StageError

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dirs(root):
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest(root):
    dirs = step_dirs(root)
    return dirs[-1] if dirs else None


def save(root, step, model_state, optim_state, meta, keep=2):
    """Write step `step` atomically; keep the newest `keep` checkpoints (a failed save keeps the old)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        torch.save(model_state, tmp / "model.pt")
        if optim_state is not None:
            torch.save(optim_state, tmp / "optim.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StageError(f"could not write checkpoint {final} ({e}); the previous checkpoint is kept") from e
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in step_dirs(root)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path, map_location="cpu", with_optim=True):
    """(model_state, optim_state or None, meta) of a checkpoint directory."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        model_state = torch.load(path / "model.pt", map_location=map_location, weights_only=True)
        optim_state = None
        if with_optim and (path / "optim.pt").exists():
            optim_state = torch.load(path / "optim.pt", map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise StageError(f"checkpoint {path} is unreadable ({e}); delete it to resume from an older one") from e
    return model_state, optim_state, meta
