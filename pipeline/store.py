"""The hash-addressed store: atomic writes, sealing a stage's outputs with `manifest.json`, verifying.

A store directory `results/store/<stage>/<key>/` is complete only once `manifest.json` exists; it is
written last and atomically. Stages build their outputs in a work directory
(`results/work/<stage>/<key>/`) that survives kills and Snakemake's deletion of declared outputs, then
`seal()` links them into the store directory and writes the manifest.
"""

import argparse
import datetime as dt
import errno
import hashlib
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

from pipeline.errors import StageError

MANIFEST = "manifest.json"
REPO_ROOT = Path(__file__).resolve().parent.parent
# Versions recorded in every manifest: what decides the numbers a stage produces.
# (transformers, tokenizers and huggingface_hub: a HuggingFace row's model, tokenizer and fetch; None without)
TRACKED_PACKAGES = ("snakemake", "torch", "torchao", "tiktoken", "rustbpe", "pyarrow", "numpy", "pandas",
                    "transformers", "tokenizers", "huggingface_hub")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # out of space, or out of quota: the same fix


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def file_record(path):
    return {"sha256": sha256_file(path), "size": os.path.getsize(path)}


def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def disk_full_cause(error):
    """The OSError of a full disk behind `error`, also under another one raised while handling it (torch's
    zip writer raises its own RuntimeError on top of it); None when there is none."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return error
        error = error.__cause__ or error.__context__
    return None


def is_disk_full(error):
    return disk_full_cause(error) is not None


def disk_full_error(path, needed=None):
    """The StageError for a write that ran out of space: the file, the free space there, and the fix."""
    probe = Path(path) if path else Path.cwd()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    size = f" ({human_bytes(needed)})" if needed else ""
    return StageError(f"disk full writing {path or 'a file'}{size}: {human_bytes(free)} free on its filesystem. Free "
                      "space there, or point work_dir/store_dir in the config (--work/--store by hand) at a larger "
                      "disk, then rerun: finished work is kept")


def atomic_write(path, data):
    """Write bytes or text so that `path` is either absent, the old file, or the whole new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # a partial temporary file would keep the space that just ran out
        if is_disk_full(e):
            raise disk_full_error(path, len(data)) from e
        raise


def write_npy(path, array):
    """An .npy file (memory-mappable with numpy.load(mmap_mode="r")), written atomically."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write(path, buf.getvalue())


def json_text(obj):
    """The one JSON layout the store writes, so a parsed file re-serialises to the same bytes (and sha256)."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json(path, obj):
    atomic_write(path, json_text(obj))


def now_iso():
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def git_state():
    """Commit and dirty flag of the checkout the stage ran from (None outside a git checkout)."""
    def git(*args):
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions():
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware():
    gpus = []
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True)
        gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return {"host": socket.gethostname(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "gpus": gpus}


def work_dir(spec, work_root):
    return Path(work_root) / spec["stage"] / spec["key"]


def store_dir(spec, store_root):
    return Path(store_root) / spec["stage"] / spec["key"]


def link_or_copy(src, dst):
    """Put `src` at `dst` atomically: hard-linked when possible (same filesystem: free, and it keeps the work
    copy for a resume), else copied."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        try:
            shutil.copyfile(src, tmp)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if is_disk_full(e):
                raise disk_full_error(dst, os.path.getsize(src)) from e
            raise
    os.replace(tmp, dst)


def seal(spec, files, src_dir, out_dir, *, resolved=None, started_at=None, extra=None):
    """Publish `files` (names relative to `src_dir`) into `out_dir`, write the manifest last, drop `src_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # never a manifest over half-replaced files
    outputs = {}
    for name in files:
        src = Path(src_dir) / name
        if not src.is_file():
            raise StageError(f"stage {spec['stage']} did not produce {src}")
        dst = out_dir / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.resolve() != dst.resolve():
            link_or_copy(src, dst)
        outputs[name] = file_record(dst)
    finished = now_iso()
    manifest = {
        "stage": spec["stage"],
        "key": spec["key"],
        "params": spec["params"],
        "settings": spec.get("settings", {}),
        "resolved": resolved or {},
        "inputs": spec["inputs"],
        "source_digest": spec["source_digest"],
        "git": git_state(),
        "packages": package_versions(),
        "hardware": hardware(),
        "command": sys.argv,
        "started_at": started_at or finished,
        "finished_at": finished,
        "outputs": outputs,
    }
    if started_at:
        start = dt.datetime.fromisoformat(started_at)
        manifest["wall_time_s"] = (dt.datetime.fromisoformat(finished) - start).total_seconds()
    manifest.update(extra or {})
    write_json(out_dir / MANIFEST, manifest)
    if Path(src_dir).resolve() != out_dir.resolve():
        shutil.rmtree(src_dir, ignore_errors=True)  # the store holds it now; scratch is only for resuming
    return manifest


def read_manifest(directory):
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise StageError(f"{directory} has no {MANIFEST}: the stage that writes it did not finish; "
                         "rerun the Snakemake target that produces it")
    return json.loads(path.read_text())


def verify(directory, hash_up_to=None):
    """Problems with one store directory, as messages naming the file ([] when it verifies).
    Files larger than `hash_up_to` bytes are checked by size only (None: hash everything)."""
    try:
        manifest = read_manifest(directory)
    except StageError as e:
        return [str(e)]
    problems = (mismatch(Path(directory) / name, rec, hash_up_to) for name, rec in manifest["outputs"].items())
    return [p for p in problems if p]


def mismatch(path, record, hash_up_to=None):
    """Why `path` is not the file its manifest `record` ({sha256, size}) describes; None when it is."""
    if not path.is_file():
        return f"{path}: missing (manifest lists it)"
    if os.path.getsize(path) != record["size"]:
        return f"{path}: size {os.path.getsize(path)} != {record['size']} in manifest"
    if (hash_up_to is None or record["size"] <= hash_up_to) and sha256_file(path) != record["sha256"]:
        return f"{path}: sha256 differs from manifest (edited after the stage wrote it)"
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.store", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check every output of store directories against their manifests")
    v.add_argument("dirs", nargs="*", default=["results/store"],
                   help="store directories, or a store root to check every <stage>/<key> below it")
    args = ap.parse_args(argv)
    dirs = []
    for d in map(Path, args.dirs):
        if (d / MANIFEST).exists() or not d.is_dir():
            dirs.append(d)
        else:  # a store root or a stage folder: every directory two or one levels down
            dirs += sorted(p.parent for p in d.glob(f"**/{MANIFEST}"))
    bad = 0
    for d in dirs:
        problems = verify(d)
        bad += bool(problems)
        for p in problems:
            print(f"FAIL {p}")
    print(f"{len(dirs) - bad} of {len(dirs)} store directories verify")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
