"""Where a training step's time goes, ours beside nanochat's: forward, backward, optimizer, data (the next
batch from each side's own loader) and eval (one val bpb), each side in a process of its own, built as its
train script builds it (compiled or not as that run was), on what `bench/train_throughput.py --nanochat`
left in its results folder (the flags, our store, nanochat's base dir with its tokenizer).

    .venv/bin/python bench/train_phases.py --nanochat /tmp/nanochat-92d63d4 \\
        --nanochat-python /path/to/nanochat-venv/bin/python --dir results/throughput/92d63d4/d4_cpu

Median milliseconds of --steps steps after 3 untimed ones; the collector frozen after the first, as both
train scripts do. The nanochat side imports only torch, the checkout and pipeline.runtime (it runs in
nanochat's python).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from pipeline import runtime  # noqa: E402  (gc and os only: it imports in nanochat's python too)

PHASES = ("data", "forward", "backward", "optimizer")


def timed_steps(next_batch, model, optimizer, steps, warmup=3):
    """Median seconds of each phase of a step; the loss is logged like both scripts log it (.item())."""
    times = {phase: [] for phase in PHASES}
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        x, y = next_batch()
        t1 = time.perf_counter()
        loss = model(x, y)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        t4 = time.perf_counter()
        if i == 0:
            runtime.freeze_gc()  # as both train scripts do after their first step
        if i >= warmup:
            for phase, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                times[phase].append(dt)
    return {phase: statistics.median(t) for phase, t in times.items()}


def ours(d, steps):
    from pipeline import cli, evaluate, launch, plan, train
    config_path = d / "config.yaml"
    cfg = plan.load_config(config_path)
    spec = cli.row_specs(cfg, config_path, "fidelity", "train")[0]
    inputs = [Path(cfg["store_dir"]) / r for r in spec["inputs"]]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = train.Trainer(train.parse_args(launch.flag_args(spec["params"])), spec, inputs, tmp, Path(tmp) / "w")
        trainer.build()

        def next_batch():
            x, y = evaluate.batch_to(next(trainer.loader), trainer.device)
            return x, y

        def step_model(x, y):
            with evaluate.autocast(trainer.device):
                return trainer.compiled(x, y)

        result = timed_steps(next_batch, step_model, trainer.optimizer, steps)
        t0 = time.perf_counter()
        trainer.evaluate()
        result["eval"] = time.perf_counter() - t0
        result["compiled"] = trainer.compiled is not trainer.model
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def nanochat(d, steps, checkout, run, model_config):
    os.environ["NANOCHAT_BASE_DIR"] = str(d / "nanochat_base")
    sys.path.insert(0, str(checkout))
    from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit as val_loader
    from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit as loader
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes, get_tokenizer
    device = torch.device(run["device_type"])
    torch.manual_seed(42)
    fields = {k: v for k, v in model_config.items() if k in GPTConfig.__dataclass_fields__}
    with torch.device("meta"):
        model = GPT(GPTConfig(**fields, n_kv_head=model_config["n_head"]))
    model.to_empty(device=device)
    model.init_weights()
    compiled = torch.compile(model, dynamic=False)  # as its base_train does on every device
    optimizer = model.setup_optimizer()
    tokenizer = get_tokenizer()
    B, T = run["device_batch_size"], run["max_seq_len"]
    train_loader = loader(tokenizer, B, T, split="train", device=device)

    def next_batch():
        x, y, _ = next(train_loader)
        return x, y

    result = timed_steps(next_batch, compiled, optimizer, steps)
    compiled.eval()
    t0 = time.perf_counter()
    evaluate_bpb(compiled, val_loader(tokenizer, B, T, split="val", device=device), run["eval_tokens"] // (B * T),
                 get_token_bytes(device))
    result["eval"] = time.perf_counter() - t0
    result["compiled"] = True
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="a results folder of train_throughput.py --nanochat")
    ap.add_argument("--nanochat", type=Path, required=True, help="the nanochat checkout that run compared with")
    ap.add_argument("--nanochat-python", default=sys.executable)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--side", choices=["ours", "nanochat"], help=argparse.SUPPRESS)  # one side, in its process
    ap.add_argument("--model-config", type=json.loads, help=argparse.SUPPRESS)
    args = ap.parse_args()
    d = args.dir.resolve()
    run = json.loads((d / "results.json").read_text())["run"]
    if args.side:
        result = (ours(d, args.steps) if args.side == "ours"
                  else nanochat(d, args.steps, args.nanochat.resolve(), run, args.model_config))
        print(json.dumps(result))
        return
    from pipeline import launch, train
    model_config = train.resolve(train.parse_args(launch.flag_args(run)), 32768, 1)["model"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    results = {}
    for side, python in (("nanochat", args.nanochat_python), ("ours", sys.executable)):
        cmd = [python, __file__, "--side", side, "--dir", str(d), "--nanochat", str(args.nanochat),
               "--steps", str(args.steps), "--model-config", json.dumps(model_config)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{side} side failed:\n{done.stderr[-3000:]}")
        results[side] = json.loads(done.stdout.strip().splitlines()[-1])
    (d / "phases.json").write_text(json.dumps(results, indent=1))
    print(f"{d.name}: median ms of {args.steps} steps (eval: one val bpb of {run['eval_tokens']} tokens, s)")
    print(f"{'':10}" + "".join(f"{p:>11}" for p in (*PHASES, "step", "eval s")))
    for side, r in results.items():
        step = sum(r[p] for p in PHASES)
        print(f"{side:10}" + "".join(f"{1000 * r[p]:11.1f}" for p in PHASES) + f"{1000 * step:11.1f}{r['eval']:11.2f}")


if __name__ == "__main__":
    main()
