"""The command line every stage shares, and the one runner every stage's spec goes through.

    python -m pipeline.<stage> --spec '<json>'      # one spec, as Snakemake passes it
    python -m pipeline.<stage> --row smoke          # every spec of this stage that the row needs
    torchrun ... -m pipeline.train -- --row smoke   # the same, one process per rank

Either way the spec, and so the key, comes from `pipeline.plan`: keys are computed in one place. However
a stage is started (Snakemake, by hand, torchrun), `run_target` runs it the same way: it holds the key's
lock (pipeline.keylock), skips a spec whose store directory is sealed, refuses an input whose stage did
not finish, and leaves the stage's `store.seal` as the last thing done.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import keylock, launch, plan, store
from pipeline.errors import StageError

DEFAULT_STORE = "results/store"
DEFAULT_WORK = "results/work"


def parser(stage, description, out_help=None):
    ap = argparse.ArgumentParser(prog=f"python -m pipeline.{stage}", description=description)
    ap.add_argument("--spec", help="the stage spec as JSON, as pipeline.plan makes it (what Snakemake passes)")
    ap.add_argument("--row", help="run every spec of this stage that this row of the config needs")
    ap.add_argument("--config", default="config/config.yaml", help="config file for --row (default: %(default)s)")
    ap.add_argument("--store", help=f"store root (default: the config's store_dir, or {DEFAULT_STORE})")
    ap.add_argument("--work", help="root for resumable scratch that survives a kill "
                                   f"(default: the config's work_dir, or {DEFAULT_WORK})")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="worker threads (default: all cores)")
    ap.add_argument("--inputs", nargs="+", help="with --spec: the input store directories in the spec's order "
                                               "(default: <store>/<stage>/<key> of each)")
    ap.add_argument("--out", help=out_help or "with --spec: the output store directory "
                                              "(default: <store>/<stage>/<key>)")
    return ap


def roots(args):
    """(store root, work root) of a command that names no spec: --store/--work, else those of --config where
    that file is there, else results/store and results/work."""
    cfg = plan.load_config(args.config) if Path(args.config).is_file() else {}
    return (Path(args.store or cfg.get("store_dir", DEFAULT_STORE)),
            Path(args.work or cfg.get("work_dir", DEFAULT_WORK)))


def row_specs(cfg, config_path, row, stage):
    """The specs of `stage` that `row` needs (a row without that stage is an error)."""
    p = plan.make_plan(cfg)
    if row not in p.rows:
        raise StageError(f"{config_path}: no row named {row!r} (rows: {', '.join(p.rows)})")
    if not p.rows[row].get(stage):
        raise StageError(f"{config_path}: row {row!r} has no {stage} stage")
    return [p.specs[k] for k in p.rows[row][stage]]


def user_errors(main):
    """Decorate a CLI main: a StageError, or a full disk met by a write the stage does not guard itself,
    becomes one `error: ...` line and exit status 2, no traceback."""
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs) or 0
        except StageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except Exception as e:
            full = store.disk_full_cause(e)
            if full is None:
                raise
            print(f"error: {store.disk_full_error(full.filename)}", file=sys.stderr)
            return 2
    return guarded


@dataclass
class Target:
    """One spec to run, with where it reads, writes and keeps its resumable scratch."""
    spec: dict
    inputs: list
    out: Path
    work_root: Path


def targets(stage, args, specs_from_args=None):
    """The Targets a command line names: --spec (paths from --inputs/--out, else the store's), --row, or
    the stage's own selection (`specs_from_args(args)`)."""
    roots = {"store_dir": DEFAULT_STORE, "work_dir": DEFAULT_WORK}
    if args.spec:
        specs = [json.loads(args.spec)]
    elif args.row:
        cfg = plan.load_config(args.config)
        roots.update((k, cfg[k]) for k in roots)
        specs = row_specs(cfg, args.config, args.row, stage)
    elif specs_from_args is not None:
        specs = specs_from_args(args)
    else:
        raise StageError(f"say what to run: --row <row of {args.config}> (`python -m pipeline.plan show` lists "
                         "them), or --spec as Snakemake passes it")
    store_root, work_root = Path(args.store or roots["store_dir"]), Path(args.work or roots["work_dir"])
    out = []
    for spec in specs:
        if spec.get("stage") != stage:
            raise StageError(f"--spec is a {spec.get('stage')!r} spec; python -m pipeline.{stage} runs {stage} specs")
        inputs = args.inputs if args.inputs and args.spec else [store_root / r for r in spec["inputs"]]
        if len(inputs) != len(spec["inputs"]):
            raise StageError(f"--inputs gave {len(inputs)} directories; the spec reads {len(spec['inputs'])}")
        out.append(Target(spec, [Path(d) for d in inputs],
                          Path(args.out) if args.out and args.spec else store.store_dir(spec, store_root), work_root))
    return out


def run_target(target, body, threads=1):
    """Run `body(spec, inputs=, out=, work=, threads=)` for one target, the one way every stage runs:
    under the key's lock; not at all when its store directory is sealed; never on an unfinished input.
    The body seals the store directory as its last act (rank 0 only, under torchrun)."""
    spec, out = target.spec, target.out
    name, done = f"{spec['stage']}-{spec['key']}", target.out / store.MANIFEST
    rank = int(os.environ.get("RANK", 0))
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if rank == 0 else (lambda m: None)
    with keylock.for_stage(target.work_root, name, done):   # a second copy waits, then finds it done
        if done.is_file():
            say(f"{spec['stage']} {spec['key']}: up to date ({out})")
            return
        for d in target.inputs:
            store.read_manifest(d)
        t0 = time.time()
        body(spec, inputs=target.inputs, out=out, work=store.work_dir(spec, target.work_root), threads=max(1, threads))
        if rank == 0 and not done.is_file():
            raise StageError(f"{spec['stage']} {spec['key']}: the stage ended without sealing {out} (a bug: please "
                             "report it with the log)")
    say(f"{spec['stage']} {spec['key']}: done in {time.time() - t0:.1f}s -> {out}")


def run_stage(stage, ap, run, argv=None, specs_from_args=None):
    """Parse, collect the targets, run each through run_target; a user error exits 2 with one clear line."""
    return _run_all(stage, ap.parse_args(launch.after_separator(sys.argv[1:] if argv is None else argv)), run,
                    specs_from_args)


@user_errors
def _run_all(stage, args, run, specs_from_args):
    for target in targets(stage, args, specs_from_args):
        run_target(target, run, args.threads)
    return 0
