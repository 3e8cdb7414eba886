"""keylock: at most one process works on a store key at a time, whichever Snakemake started it.

    python -m pipeline.keylock --work results/work --name train-<key> --done <out>/manifest.json -- CMD...

Snakemake's own lock is not enough: an instance that finishes deletes the whole `.snakemake/locks`
directory, and a later instance then relaunches a job that is still running. So each stage holds an
exclusive flock on <work>/locks/<name>.lock for its whole run. A second copy waits for the first and,
once the first has sealed its store directory, does nothing. The kernel drops a flock when its holder
dies (SIGKILL included), so a killed run never leaves a stale lock behind.

Every stage takes the lock through `for_stage` (pipeline.cli's runner), which knows three holders:
- this process, for a stage run as one process;
- the launcher: Snakemake's train and core commands take the lock here, around the whole torchrun
  (one holder, not one per rank), and tell the ranks so through PIPELINE_KEYLOCK; their ranks die with
  the launcher (die_with_launcher), so the lock is never free while a rank still runs;
- rank 0 of a torchrun started by hand: the other ranks wait until the lock names their run.
"""

import argparse
import ctypes
import fcntl
import json
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline import launch

HELD_ENV = "PIPELINE_KEYLOCK"  # set by the launcher to the name of the lock it holds for its whole process tree
POLL_S = 0.5


def lock_path(work_root, name):
    return Path(work_root) / "locks" / f"{name}.lock"


def _holder(f):
    f.seek(0)
    try:
        h = json.loads(f.read() or "{}")
        return f"pid {h['pid']} on {h['host']}, since {h['since']}"
    except (ValueError, KeyError):
        return "another process"


@contextmanager
def held(work_root, name, log=None, run_id=None):
    """Hold the key's lock, waiting (and saying so) while another process holds it. Yields the file,
    which stays open (and locked) until the block ends; `inheritable` for a command exec'd under it.
    `run_id` (torchrun's) goes into the lock file, for the ranks that wait on it."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    path = lock_path(work_root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{name}: already running ({_holder(f)}); waiting for it to finish rather than starting a "
                f"second copy (lock: {path})")
            t0 = time.time()
            fcntl.flock(f, fcntl.LOCK_EX)
            log(f"{name}: the other run ended after {time.time() - t0:.0f}s of waiting")
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run": run_id,
                            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        f.flush()
        yield f


def _holder_run(path):
    try:
        return json.loads(Path(path).read_text() or "{}").get("run")
    except (OSError, ValueError):
        return None


@contextmanager
def for_stage(work_root, name, done, log=None):
    """The key's lock for one stage run, from whichever holder this process has (see the module's doc).
    A rank other than 0 of a torchrun started by hand holds nothing: it waits until rank 0 holds the
    lock for this very run (its run id in the lock file) or `done` exists, and the collectives then keep
    it in step with rank 0."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if os.environ.get(HELD_ENV) == name:
        yield
    elif world == 1 or rank == 0 or not run_id:
        with held(work_root, name, log if rank == 0 else (lambda m: None), run_id=run_id):
            yield
    else:
        path, said = lock_path(work_root, name), False
        while _holder_run(path) != run_id and not Path(done).is_file():
            if not said:
                said = True
                log(f"{name}: rank {rank} waits for rank 0 to hold the key's lock")
            time.sleep(POLL_S)
        yield


def die_with_launcher():
    """Under torchrun, have the kernel SIGKILL this rank when its launcher dies.

    torchrun starts every rank in a session of its own, so killing the job's process group (what
    Snakemake does to a job, or a kill of the run) would stop the launcher, which holds the key's
    lock, and leave the ranks training on: a rerun would then start a second copy beside them, and
    the orphans would seal and clear the work directory under it."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the launcher was already gone before we asked
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.keylock", description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="the work root; locks live in <work>/locks/")
    ap.add_argument("--name", required=True, help="<stage>-<key>")
    ap.add_argument("--done", required=True, help="the manifest whose presence means the work is done")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run under the lock")
    args = ap.parse_args(argv)
    command = launch.after_separator(args.command)
    if not command:
        ap.error("give the command to run after --")
    with held(args.work, args.name) as f:
        if Path(args.done).is_file():
            print(f"{args.name}: already done ({args.done}); nothing to run", file=sys.stderr)
            return 0
        os.set_inheritable(f.fileno(), True)  # the exec'd launcher keeps holding the lock until it exits
        os.environ[HELD_ENV] = args.name  # ... and its ranks must not wait for a lock their launcher holds
        os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
