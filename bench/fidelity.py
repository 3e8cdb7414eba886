"""Fidelity: nanochat's own base_train at a commit and this pipeline with that commit's recipe, side by side
on the same data, device and flags, one after the other: both val bpb curves, step-0 losses, tok/s and
peak memory. What docs/fidelity.md records.

    git -C nanochat archive 6ed7d1d | tar -x -C /tmp/nanochat-6ed7d1d     # any checkout at the commit
    .venv/bin/python bench/fidelity.py --nanochat /tmp/nanochat-6ed7d1d --recipe 6ed7d1d \\
        --nanochat-python /path/to/venv/bin/python [--data ../shared/data/webtext] [--out results/fidelity]

The data folder holds nanochat-format parquet shards; the last one validates, the others train (both
sides train their own tokenizer on them: nanochat's tok_train and our tokenizer stage, same settings).
The run is nanochat's CPU-sized d4: seq 512, 4096-token batches (8 rows, no accumulation), 150 steps,
--window-pattern=L, head dim 64, val bpb every 50 steps on 131072 tokens. nanochat's python needs its
own dependencies (rustbpe, tiktoken, pyarrow, wandb, filelock, psutil, torch); ours is this checkout's.
Goal: our val bpb at the last step within 0.5% of nanochat's.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's pipeline
from pipeline import launch, plan, recipe, store  # noqa: E402

RUN = {"device_type": "cpu", "depth": 4, "max_seq_len": 512, "device_batch_size": 8, "total_batch_size": 4096,
       "num_iterations": 150, "window_pattern": "L", "head_dim": 64, "eval_every": 50, "eval_tokens": 131072,
       "sample_every": -1, "save_every": -1, "core_metric_every": -1}
GOAL = 0.005  # relative val bpb difference at the last step


def pythonpath(first):
    """PYTHONPATH with `first` ahead of what is set already (on the lent GPU that holds the carried wheels
    and the wandb stub bench/gpu_check.sh installs)."""
    return os.pathsep.join(filter(None, [str(first), os.environ.get("PYTHONPATH")]))


def run_measured(cmd, env, log):
    """Run to completion with its output in `log`; (wall s, peak RSS of this child in bytes)."""
    t0 = time.time()
    wrapper = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
               "print('maxrss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(rc)")
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-c", wrapper, *cmd], env=env, stdout=f, stderr=subprocess.STDOUT)
    text = Path(log).read_text()
    if rc:
        sys.exit(f"{' '.join(map(str, cmd[:4]))} ... failed (exit {rc}); see {log}:\n{text[-3000:]}")
    rss = int(re.findall(r"maxrss_kb (\d+)", text)[-1]) * 1024
    return time.time() - t0, rss


def nanochat_side(args, out, data, run=RUN):
    """nanochat's tok_train and base_train at its commit with the flags `run`, in a base dir of its own;
    parsed from its log."""
    base = out / "nanochat_base"
    for sub in ("base_data", "base_data_climbmix"):  # FineWeb-era and ClimbMix-era commits read one of these
        (base / sub).mkdir(parents=True, exist_ok=True)
        for shard in data:
            link = base / sub / shard.name
            if not link.exists():
                link.symlink_to(shard.resolve())
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(args.threads)}
    py = [args.nanochat_python]
    if not (base / "tokenizer" / "tokenizer.pkl").exists():
        subprocess.run([*py, "-m", "scripts.tok_train"], cwd=args.nanochat, env=env, check=True, capture_output=True)
    flags = launch.flag_args(run)
    wall, rss = run_measured([*py, "-m", "scripts.base_train", "--run=dummy", *flags],
                             {**env, "PYTHONPATH": pythonpath(args.nanochat)}, out / "nanochat.log")
    text = (out / "nanochat.log").read_text()
    bpb = {str(int(s)): float(v) for s, v in re.findall(r"Step (\d+) \| Validation bpb: ([\d.]+)", text)}
    steps = re.findall(r"step (\d+)/\d+ .*?\| loss: ([\d.]+) .*?\| tok/sec: ([\d,]+)", text)
    return {"val_bpb": bpb, "step0_loss": float(steps[0][1]),
            "tok_per_sec": statistics.median(int(t.replace(",", "")) for s, _, t in steps if int(s) >= 15),
            "peak_rss_bytes": rss, "wall_s": wall}


def our_side(args, out, data, run=RUN):
    """Our tokenizer, token shards and train stages for a row of this recipe with the flags `run` on the same
    shards; the train stage always runs (a sealed result of an earlier run is removed first)."""
    numbers = [int(path.stem.removeprefix("shard_")) for path in data]
    train_shards = len(data) - 1
    if numbers[:-1] != list(range(train_shards)):  # our download names shards by number (nanochat: by order)
        sys.exit(f"{data[0].parent}: the training shards must be shard_00000 .. shard_{train_shards - 1:05d} "
                 f"(found {', '.join(path.name for path in data[:-1])}); the last file validates")
    cfg = {"store_dir": str(out.parent / "store"), "work_dir": str(out / "work"),  # shards shared by all recipes
           "datasets": {"fidelity": {"hf_repo": None, "base_url": str(data[0].parent.resolve()),
                                     "val_shard": numbers[-1], "block_size": train_shards}},
           "tokenizers": {"fidelity_32k": {"dataset": "fidelity", "vocab_size": 32768, "max_chars": 2_000_000_000,
                                           "doc_cap": 10_000, "train_shards": train_shards}},
           "rows": {"fidelity": {"recipe": args.recipe, "dataset": "fidelity", "tokenizer": "fidelity_32k",
                                 "train_shards": train_shards, "launch": {"nproc_per_node": 1},
                                 "train": {**run, "run": "dummy", "compile": args.compile}}}}
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": pythonpath(REPO)}
    common = ["--row", "fidelity", "--config", str(config_path)]
    for stage in ("download", "tokenizer", "pretokenize"):
        subprocess.run([sys.executable, "-m", f"pipeline.{stage}", *common], env=env, check=True, capture_output=True)
    p = plan.make_plan(plan.load_config(config_path))  # the key now: the sources may change while it trains
    train_dir = Path(cfg["store_dir"]) / "train" / p.rows["fidelity"]["train"][0]
    shutil.rmtree(train_dir, ignore_errors=True)  # measured now, not read back from an earlier run
    wall, rss = run_measured([sys.executable, "-m", "pipeline.train", *common], env, out / "ours.log")
    if not (train_dir / "train_summary.json").exists():
        sys.exit(f"{train_dir}: not there after the run; a pipeline source edited while it ran gives another key")
    summary = json.loads((train_dir / "train_summary.json").read_text())
    return {**train_results(train_dir), "peak_rss_bytes": rss, "wall_s": wall,
            "peak_memory_bytes": summary["peak_memory_bytes"], "compile_reason": summary.get("compile_reason"),
            "tokenizer": str(Path(cfg["store_dir"]) / "tokenizer" / p.rows["fidelity"]["tokenizer"][0])}


def train_results(train_dir):
    """val bpb by step, step-0 loss and median tok/s past step 15, from a train store directory."""
    records = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    return {"val_bpb": {str(r["step"]): r["val_bpb"] for r in records if "val_bpb" in r},
            "step0_loss": losses[0]["loss"],
            "tok_per_sec": statistics.median(r["tok_per_sec"] for r in losses if r["step"] > 15)}


def same_tokenizer(nanochat_base, ours):
    """Whether both sides' BPE merges and special tokens are identical (then their token streams are)."""
    import pickle
    enc = pickle.loads((nanochat_base / "tokenizer" / "tokenizer.pkl").read_bytes())
    from pipeline import tokenizer
    mine = tokenizer.load(ours)
    return enc._mergeable_ranks == mine._mergeable_ranks and enc._special_tokens == mine._special_tokens


def report(results):
    """Both sides' numbers, and the goal; a side not run yet is left out."""
    sides = [side for side in ("nanochat", "ours") if side in results]
    print(f"recipe {results['recipe']} ({recipe.DESCRIPTIONS[results['recipe']]}); "
          f"same tokenizer: {results.get('same_tokenizer', 'not compared')}")
    print(f"{'':18}" + "".join(f"{side:>12}" for side in sides))
    for step in sorted(results[sides[0]]["val_bpb"], key=int):
        print(f"val bpb step {step:<5}" + "".join(f"{results[side]['val_bpb'][step]:12.6f}" for side in sides))
    print(f"{'step-0 loss':18}" + "".join(f"{results[side]['step0_loss']:12.6f}" for side in sides))
    print(f"{'tok/s (15-150)':18}" + "".join(f"{results[side]['tok_per_sec']:12,.0f}" for side in sides))
    print(f"{'peak RSS GiB':18}" + "".join(f"{results[side]['peak_rss_bytes'] / 2**30:12.2f}" for side in sides))
    if len(sides) == 2:
        nano, ours, last = results["nanochat"], results["ours"], str(RUN["num_iterations"])
        gap = abs(ours["val_bpb"][last] / nano["val_bpb"][last] - 1)
        print(f"step-0 loss difference {ours['step0_loss'] - nano['step0_loss']:+.2e}; tok/s ours/nanochat "
              f"{ours['tok_per_sec'] / nano['tok_per_sec']:.3f}")
        print(f"goal: val bpb at step {last} within {GOAL:.1%} of nanochat's: {gap:.3%} -> "
              f"{'MET' if gap <= GOAL else 'NOT MET'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanochat", type=Path, required=True, help="a nanochat checkout at the recipe's commit")
    ap.add_argument("--recipe", required=True, choices=recipe.COMMITS)
    ap.add_argument("--nanochat-python", default=sys.executable, help="a python with nanochat's dependencies")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "webtext")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "fidelity")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--compile", default="auto", choices=["auto", "yes", "no"], help="ours (nanochat compiles on CPU)")
    ap.add_argument("--only", choices=["nanochat", "ours"], help="run one side (the other from a previous run)")
    args = ap.parse_args()
    data = sorted(args.data.glob("shard_*.parquet"))
    if len(data) < 2:
        sys.exit(f"{args.data}: needs at least two shard_*.parquet files (the last one validates)")
    out = args.out / args.recipe
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.only != "ours":
        results["nanochat"] = nanochat_side(args, out, data)
    if args.only != "nanochat":
        results["ours"] = our_side(args, out, data)
        tokenizer_dir = Path(results["ours"].pop("tokenizer"))
        if (out / "nanochat_base" / "tokenizer").is_dir():
            results["same_tokenizer"] = same_tokenizer(out / "nanochat_base", tokenizer_dir)
    results.update(recipe=args.recipe, run=RUN, threads=args.threads, compile=args.compile,
                   measured_at=store.now_iso())
    store.write_json(results_path, results)
    report(results)
    shutil.rmtree(out / "work", ignore_errors=True)


if __name__ == "__main__":
    main()
