"""Training checkpoints: one directory per step, complete or absent.

    <dir>/step_000123/model.pt       fp32 master weights (state dict)
                      optim.pt       optimizer state (made whole on every rank first, so rank 0 writes it)
                      meta.json      step, loader position, loop state, RNG, model config, flags,
                                     and the size of each file above

A checkpoint is written as `step_N.tmp-<pid>/` and renamed into place, so a kill never leaves a
half-written `step_N/`, and a full disk leaves the older ones as they were. A rerun resumes from the
newest one that reads back whole: one damaged later (cut short, a file lost) is passed over with a
warning; one of another model config is refused.
"""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from pipeline import store
from pipeline.errors import StageError

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


class DamagedCheckpoint(StageError):
    """A checkpoint that cannot be read back whole (cut short, edited, a file missing)."""


def _write_synced(path, write):
    """`write(f)` into a new binary file, flushed to the disk before it returns."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save(root, step, model_state, optim_state, meta, keep=2):
    """Write step `step` atomically; keep the newest `keep` checkpoints (a failed save keeps the old)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    states = {"model.pt": model_state, "optim.pt": optim_state}
    try:
        for name, state in states.items():
            if state is not None:
                # a Python file object, so a full disk surfaces as OSError(ENOSPC), not torch's opaque RuntimeError
                _write_synced(tmp / name, lambda f, state=state: torch.save(state, f))
        name = "meta.json"
        sizes = {n: (tmp / n).stat().st_size for n, state in states.items() if state is not None}
        text = json.dumps({**meta, "files": sizes}, indent=2, sort_keys=True)
        _write_synced(tmp / name, lambda f: f.write(text.encode()))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # the partial files would hold on to the space that ran out
        kept = f"the previous checkpoint {latest(root)} is kept" if latest(root) else "there is no earlier checkpoint"
        if store.is_disk_full(e):
            raise StageError(f"{store.disk_full_error(final / name)}; {kept}") from e
        if isinstance(e, OSError):
            raise StageError(f"could not write checkpoint {final / name} ({e}); {kept}") from e
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in step_dirs(root)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path, map_location="cpu", with_optim=True, model=None):
    """(model_state, optim_state or None, meta) of a checkpoint directory. DamagedCheckpoint when its
    files are not whole; with `model` (a model config dict), StageError when it was made for another."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("meta.json holds no object")
        for name, size in meta.get("files", {}).items():
            got = (path / name).stat().st_size
            if got != size:
                raise ValueError(f"{name} is {got} bytes, {size} when written")
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged ({e})") from e
    model = json.loads(json.dumps(model))  # as meta.json holds it: tuples become lists
    if model is not None and meta.get("model") != model:
        theirs = meta.get("model") or {}
        diff = ", ".join(f"{k} {theirs.get(k)} there, {v} here" for k, v in model.items() if theirs.get(k) != v)
        raise StageError(f"checkpoint {path} is of another model ({diff or 'no model config recorded'}), so not this "
                         f"run's: move or delete {path}, then rerun (or pass --resume-from-step with one of this "
                         "run's)")
    try:
        model_state = torch.load(path / "model.pt", map_location=map_location, weights_only=True)
        optim_state = None
        if with_optim and ((path / "optim.pt").exists() or "optim.pt" in meta.get("files", {})):
            optim_state = torch.load(path / "optim.pt", map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged ({str(e).splitlines()[0]})") from e
    return model_state, optim_state, meta


def load_newest(root, map_location="cpu", model=None, warn=None):
    """(path, model_state, optim_state, meta) of the newest checkpoint under `root` that reads back whole,
    None when there is none. A damaged newer one is passed over with a warning: it is rewritten when
    training reaches its step again. All of them damaged is refused, naming each."""
    warn = warn or (lambda message: print(message, file=sys.stderr))
    problems = []
    for path in reversed(step_dirs(root)):
        try:
            found = (path, *load(path, map_location, model=model))
        except DamagedCheckpoint as e:
            problems.append(str(e))
            continue
        for problem in problems:
            warn(f"warning: {problem}; resuming from the older {path.name} instead")
        return found
    if problems:
        raise StageError(f"no checkpoint under {root} reads back whole: {'; '.join(problems)}. Delete {root} to "
                         "train from step 0")
    return None
