"""The command line every stage shares.

    python -m pipeline.<stage> --spec '<json>'      # one spec, as Snakemake passes it
    python -m pipeline.<stage> --row smoke          # every spec of this stage that the row needs

Either way the spec, and so the key, comes from `pipeline.plan`: keys are computed in one place.
A spec whose store directory already has a manifest is skipped.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pipeline import keylock, plan, store
from pipeline.store import StageError

DEFAULT_STORE = "results/store"
DEFAULT_WORK = "results/work"


def parser(stage, description):
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
    ap.add_argument("--out", help="with --spec: the output store directory (default: <store>/<stage>/<key>)")
    return ap


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


def run_stage(stage, ap, run, argv=None, specs_from_args=None):
    """Parse, collect the specs, run each; a user error exits 2 with one clear line, no traceback."""
    args = ap.parse_args(argv)
    return _run_specs(stage, ap, run, args, specs_from_args)


@user_errors
def _run_specs(stage, ap, run, args, specs_from_args):
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
        ap.error("give --spec or --row")
    store_root, work_root = Path(args.store or roots["store_dir"]), Path(args.work or roots["work_dir"])
    for spec in specs:
        out = Path(args.out) if args.out and args.spec else store.store_dir(spec, store_root)
        inputs = args.inputs if args.inputs and args.spec else [store_root / r for r in spec["inputs"]]
        if len(inputs) != len(spec["inputs"]):
            raise StageError(f"--inputs gave {len(inputs)} directories; the spec reads {len(spec['inputs'])}")
        with keylock.held(work_root, f"{stage}-{spec['key']}"):  # a second copy waits, then finds it done
            if (out / store.MANIFEST).exists():
                print(f"{stage} {spec['key']}: up to date ({out})", file=sys.stderr)
                continue
            t0 = time.time()
            for d in inputs:
                store.read_manifest(d)  # refuse an input whose stage did not finish
            run(spec, inputs=[Path(d) for d in inputs], out=out, work=store.work_dir(spec, work_root),
                threads=max(1, args.threads))
        print(f"{stage} {spec['key']}: done in {time.time() - t0:.1f}s -> {out}", file=sys.stderr)
    return 0
