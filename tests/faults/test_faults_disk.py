"""A disk that fills up while a stage writes a token shard or a checkpoint.

The stage stops with one line naming the file, the free space and the fix; no partial temporary file
is left holding the space; what was finished (earlier shards, the previous checkpoint) survives, and a
rerun once there is room carries on from it. Each case runs on a real size-limited tmpfs where the test
may mount one (root), and once more with ENOSPC simulated in Python, which runs everywhere.
"""

import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint, launch, plan, pretokenize, store, train

pytestmark = pytest.mark.fault
SLACK = 256 << 10  # what a filled disk still has free: less than any checkpoint or token shard here


# ----------------------------------------------------------------------------- full disks, real and simulated

@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a directory on a fresh tmpfs of that many bytes; unmounted afterwards."""
    mounted = []

    def mount(size):
        where = tmp_path / "disk"
        where.mkdir()
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
        if out.returncode:
            pytest.skip(f"cannot mount a size-limited tmpfs here ({out.stderr.strip() or 'mount failed'}; needs "
                        "root and CAP_SYS_ADMIN): the simulated-ENOSPC test covers the same code")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=True)


def regrow(disk, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)


class Filling:
    """A file that takes `room` more bytes, then fails as a full disk does (what it got is on disk)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            self.f.write(bytes(data[:self.room]) if not isinstance(data, str) else data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def simulate_full_disk(monkeypatch, module, name_part, room):
    """`module`'s open() of a file whose path contains `name_part`, for writing, runs out after `room` bytes."""
    real = open

    def opener(path, mode="r", *args, **kwargs):
        f = real(path, mode, *args, **kwargs)
        return Filling(f, room) if "w" in mode and name_part in str(path) else f

    monkeypatch.setattr(module, "open", opener, raising=False)


def one_error_line(err):
    """The stage's last word: one `error:` line (after its progress lines), no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def leftovers(directory):
    return sorted(p.name for p in Path(directory).rglob("*") if ".tmp-" in p.name)


# ----------------------------------------------------------------------------- a token shard

@pytest.fixture
def block(smoke_data):
    """(spec, inputs, store directory) of the smoke row's 3-shard pretokenize block."""
    p = smoke_data["plan"]
    for key in p.rows["smoke"]["pretokenize"]:
        done = store.store_dir(p.specs[key], smoke_data["cfg"]["store_dir"])
        if (done / "shard_00001.tokens.npy").exists():
            spec = p.specs[key]
            return spec, [Path(smoke_data["cfg"]["store_dir"]) / r for r in spec["inputs"]], done
    raise AssertionError("no 3-shard block in the smoke plan")


def pretokenize_into(spec, inputs, out, work_root, monkeypatch):
    """Run the stage's CLI; returns (exit status, stderr, the shards it encoded)."""
    encoded, real = [], pretokenize.encode_shard
    monkeypatch.setattr(pretokenize, "encode_shard", lambda enc, path, *a: encoded.append(path.name) or
                        real(enc, path, *a))
    argv = ["--spec", json.dumps(spec), "--inputs", *map(str, inputs), "--out", str(out), "--work", str(work_root),
            "--threads", "2"]
    return pretokenize.main(argv), encoded


def check_shard_refusal(err, work, out):
    line = one_error_line(err)
    assert re.fullmatch(rf"error: disk full writing {re.escape(str(work))}/shard_00001\.tokens\.npy \([0-9.]+ MB\): "
                        r"[0-9.]+ [KMGT]?B free on its filesystem\. Free space there, or point work_dir/store_dir "
                        r"in the config \(--work/--store by hand\) at a larger disk, then rerun: finished work is kept",
                        line)
    assert leftovers(work) == []
    assert sorted(p.name for p in work.iterdir()) == ["shard_00000.docs.npy", "shard_00000.tokens.npy"]
    assert not (out / store.MANIFEST).exists()


def test_disk_full_while_writing_a_token_shard(block, small_disk, tmp_path, capsys, monkeypatch):
    spec, inputs, done = block
    first = sum((done / f"shard_00000.{kind}.npy").stat().st_size for kind in ("tokens", "docs"))
    disk = small_disk(first + (done / "shard_00001.tokens.npy").stat().st_size // 2)
    out, work = tmp_path / "out", store.work_dir(spec, disk)
    status, encoded = pretokenize_into(spec, inputs, out, disk, monkeypatch)
    assert status == 2 and encoded == ["shard_00000.parquet", "shard_00001.parquet"]
    check_shard_refusal(capsys.readouterr().err, work, out)
    regrow(disk, 64 << 20)
    status, encoded = pretokenize_into(spec, inputs, out, disk, monkeypatch)
    assert status == 0, capsys.readouterr().err
    assert encoded == ["shard_00001.parquet", "shard_00002.parquet"]  # shard 0 was kept
    assert store.verify(out) == []
    outputs = store.read_manifest(out)["outputs"]
    assert outputs == store.read_manifest(done)["outputs"]


def test_disk_full_while_writing_a_token_shard_simulated(block, tmp_path, capsys, monkeypatch):
    spec, inputs, done = block
    out, work = tmp_path / "out", store.work_dir(spec, tmp_path / "work")
    simulate_full_disk(monkeypatch, store, "shard_00001.tokens.npy", room=1000)
    status, encoded = pretokenize_into(spec, inputs, out, tmp_path / "work", monkeypatch)
    assert status == 2 and encoded == ["shard_00000.parquet", "shard_00001.parquet"]
    check_shard_refusal(capsys.readouterr().err, work, out)


# ----------------------------------------------------------------------------- a checkpoint

@pytest.fixture
def one_thread():
    """Train in this process on one thread: two OpenMP threads on a busy 2-core CI machine run ~8x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def short_run(smoke_data, one_thread):
    """The smoke row's training cut to 4 steps, a checkpoint every 2: (spec, inputs)."""
    p = smoke_data["plan"]
    spec = p.specs[p.rows["smoke"]["train"][0]]
    params = {**spec["params"], "num_iterations": 4, "save_every": 2, "eval_every": -1}
    spec = plan.make_spec("train", params, spec["inputs"], settings=spec["settings"])
    return spec, [Path(smoke_data["cfg"]["store_dir"]) / r for r in spec["inputs"]]


def train_into(spec, inputs, out, work_root, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return train.main(launch.train_argv(spec, inputs, out, work_root))


def check_checkpoint_refusal(err, ckpts, out):
    line = one_error_line(err)
    assert re.fullmatch(rf"error: disk full writing {re.escape(str(ckpts))}/step_000004/(model|optim)\.pt: "
                        r"[0-9.]+ [KMGT]?B free on its filesystem\. Free space there, .* then rerun: finished work is "
                        rf"kept; the previous checkpoint {re.escape(str(ckpts))}/step_000002 is kept", line)
    assert [p.name for p in ckpts.iterdir()] == ["step_000002"]  # no partial step_000004.tmp-<pid>
    assert checkpoint.load(ckpts / "step_000002")[2]["step"] == 2  # whole and readable
    assert not (out / store.MANIFEST).exists()


def test_disk_full_while_writing_a_checkpoint(short_run, small_disk, tmp_path, capsys, monkeypatch):
    spec, inputs = short_run
    disk = small_disk(256 << 20)
    out, ckpts = tmp_path / "out", store.work_dir(spec, disk) / "checkpoints"
    real, filled = checkpoint.save, []

    def fill_then_save(root, step, *args, **kwargs):
        if step == 4 and not filled:  # something else takes the disk after the step-2 checkpoint
            with open(disk / "ballast", "wb") as f:
                os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(disk).free - SLACK)
            filled.append(step)
        return real(root, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", fill_then_save)
    assert train_into(spec, inputs, out, disk, monkeypatch) == 2
    check_checkpoint_refusal(capsys.readouterr().err, ckpts, out)
    (disk / "ballast").unlink()
    assert train_into(spec, inputs, out, disk, monkeypatch) == 0
    assert f"resuming from {ckpts / 'step_000002'}\n" in capsys.readouterr().err
    assert store.verify(out) == []
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4]  # the losses, then the final evaluation


def test_disk_full_while_writing_a_checkpoint_simulated(short_run, tmp_path, capsys, monkeypatch):
    spec, inputs = short_run
    out, ckpts = tmp_path / "out", store.work_dir(spec, tmp_path / "work") / "checkpoints"
    simulate_full_disk(monkeypatch, checkpoint, "step_000004.tmp-", room=100_000)
    assert train_into(spec, inputs, out, tmp_path / "work", monkeypatch) == 2
    check_checkpoint_refusal(capsys.readouterr().err, ckpts, out)
