"""Training throughput of pipeline.train's step: tok/s and MFU for one depth on this device.

reference (measured in the same run): one dense matmul of the model's MLP shape, in the training dtype:
the FLOP/s this device really delivers. ratio = the training step's FLOP/s / that matmul's FLOP/s.
MFU against the datasheet bf16 peak is printed too where the GPU is known (nanochat's definition), and
on an H100 at d26 the tok/s against nanochat's reported 78.8K (bf16) / 92.5K (fp8) per GPU.
A step is --grad-accum forward+backward passes and one optimizer step, as in a leaderboard run (an
optimizer step per pass would charge Muon's orthogonalisation 4x as often as a run does).

    .venv/bin/python bench/train_throughput.py --depth 26 --device-batch-size 16 [--fp8]
    .venv/bin/python bench/train_throughput.py --depth 2 --max-seq-len 256 --device-batch-size 8   # CPU

Side by side (--nanochat DIR, a nanochat checkout at any commit, never vendored): nanochat's own base_train
and our train stage (the checkout's recipe, --recipe), one after the other on the same data, device and
flags, each a whole run of --run-steps steps from its own launcher: both tok/s (median of steps 15 on, as
each logs them), both peak memories (the run's max RSS on a CPU, what each reports on CUDA) and the ratio.
The flags default to bench/fidelity.py's CPU run (d4, seq 512, 8 x 512-token batches, window pattern L).

    .venv/bin/python bench/train_throughput.py --nanochat /tmp/nanochat-92d63d4 --depth 4 \
        --nanochat-python /path/to/nanochat-venv/bin/python       # goal: >= 1.05x, memory <= nanochat's
"""

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # measure this checkout
from pipeline import launch, recipe, runtime, train  # noqa: E402
from pipeline import model as model_module  # noqa: E402
from pipeline.model import GPT, GPTConfig  # noqa: E402

NANOCHAT_D26_H100 = {False: 78.8e3, True: 92.5e3}  # tok/s per GPU, nanochat dev/LOG.md 2026-02-02


def timed(fn, device, repeat):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeat


def matmul_flops(config, rows, device, dtype, repeat):
    a = torch.randn(rows, config.n_embd, device=device, dtype=dtype)
    b = torch.randn(config.n_embd, 4 * config.n_embd, device=device, dtype=dtype)
    return 2 * rows * config.n_embd * 4 * config.n_embd / timed(lambda: a @ b, device, repeat)


SIDE_BY_SIDE_GOAL = 1.05  # ours/nanochat tok/s on this CPU at d4 and d6 (issue 14)


def side_by_side(args):
    """nanochat's base_train, then our train stage, with the same flags on the same shards; both tok/s,
    both peak memories, the ratio. Results also in <out>/<name>/results.json."""
    import fidelity  # the same two launchers that compare the curves (bench/fidelity.py)
    run = {**fidelity.RUN, "device_type": "cuda" if torch.cuda.is_available() else "cpu", "depth": args.depth,
           "num_iterations": args.run_steps, "eval_every": args.run_steps}  # one val bpb at the start and end
    for key in ("max_seq_len", "device_batch_size", "total_batch_size", "window_pattern", "head_dim"):
        if getattr(args, key) is not None:
            run[key] = getattr(args, key)
    if args.total_batch_size is None:  # one forward+backward per step unless told
        run["total_batch_size"] = run["device_batch_size"] * run["max_seq_len"]
    if args.fp8:
        run["fp8"] = True
    data = sorted(args.data.glob("shard_*.parquet"))
    if len(data) < 2:
        sys.exit(f"{args.data}: needs at least two shard_*.parquet files (the last one validates)")
    name = f"d{args.depth}{'_fp8' if args.fp8 else ''}_{run['device_type']}"
    out = args.out / args.recipe / name
    out.mkdir(parents=True, exist_ok=True)
    nano = fidelity.nanochat_side(args, out, data, run)
    ours = fidelity.our_side(args, out, data, run)
    ours.pop("tokenizer")
    if run["device_type"] == "cuda":  # RSS is no measure of GPU memory: what each run reports (ours: the
        # max_memory_allocated in its train_summary.json)
        nano["peak_memory_bytes"] = float(re.findall(r"Peak memory usage: ([\d.]+)MiB",
                                                     (out / "nanochat.log").read_text())[-1]) * 2**20
    else:
        nano["peak_memory_bytes"], ours["peak_memory_bytes"] = nano["peak_rss_bytes"], ours["peak_rss_bytes"]
    ratio = ours["tok_per_sec"] / nano["tok_per_sec"]
    memory = ours["peak_memory_bytes"] / nano["peak_memory_bytes"]
    results = {"nanochat": nano, "ours": ours, "ratio": ratio, "memory_ratio": memory, "run": run,
               "recipe": args.recipe, "threads": args.threads, "compile": args.compile,
               "device": torch.cuda.get_device_name() if run["device_type"] == "cuda" else f"cpu x{args.threads}"}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"{name}, recipe {args.recipe}, {results['device']}, {args.run_steps} steps, flags: "
          f"{' '.join(launch.flag_args(run))}")
    for side, r in (("nanochat", nano), ("ours", ours)):
        print(f"  {side:9} {r['tok_per_sec']:12,.0f} tok/s   peak memory {r['peak_memory_bytes'] / 2**30:6.2f} GiB   "
              f"val bpb {r['val_bpb'][str(args.run_steps)]:.6f}   wall {r['wall_s']:.0f} s")
    print(f"  ratio ours/nanochat: tok/s {ratio:.3f}, peak memory {memory:.3f}")
    goal = ratio >= SIDE_BY_SIDE_GOAL and memory <= 1
    print(f"goal: tok/s >= {SIDE_BY_SIDE_GOAL}x nanochat's with no more memory -> {'MET' if goal else 'NOT MET'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanochat", type=Path, help="side by side with this nanochat checkout's base_train")
    ap.add_argument("--nanochat-python", default=sys.executable, help="a python with nanochat's dependencies")
    ap.add_argument("--recipe", default=recipe.NEWEST, choices=recipe.COMMITS, help="the checkout's commit")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "webtext")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "throughput")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--run-steps", type=int, default=70, help="side by side: steps of each run")
    ap.add_argument("--total-batch-size", type=int, help="side by side: tokens per step (default: one pass)")
    ap.add_argument("--window-pattern", help="side by side (default L, as bench/fidelity.py)")
    ap.add_argument("--head-dim", type=int, help="side by side (default 64, as bench/fidelity.py; 128 is nanochat's)")
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--device-batch-size", type=int)
    ap.add_argument("--max-seq-len", type=int)
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--compile", default="auto", choices=["auto", "yes", "no"])
    ap.add_argument("--masked-windows", action="store_true",
                    help="short windows as SDPA with a mask even on CUDA, and no FlashAttention-3 (what "
                         "FlashAttention's window saves)")
    ap.add_argument("--no-fa3", action="store_true", help="torch's own attention kernels even where "
                    "FlashAttention-3 would load (Hopper, with HuggingFace `kernels` installed)")
    ap.add_argument("--grad-accum", type=int, default=4,
                    help="forward+backward passes per optimizer step (4: one GPU's share of run 3 on 8 GPUs; on "
                         "one GPU the optimizer then does all its work, 8x a rank's share: see --ranks)")
    ap.add_argument("--ranks", type=int, default=8, help="also report tok/s as one rank of this many GPUs, "
                    "which does 1/N of the optimizer's work (nanochat's per-GPU figures are from 8)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps, after --warmup untimed ones")
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    if args.nanochat:
        return side_by_side(args)
    args.device_batch_size = args.device_batch_size or 16
    args.max_seq_len = args.max_seq_len or 2048
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    allocator = runtime.tune_allocators(device.type)  # as train's setup_device does
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    config = GPTConfig.from_depth(args.depth, args.vocab_size, args.max_seq_len)
    model = GPT(config).to(device)
    model.init_weights()
    model.flash_windows = model.flash_windows and not args.masked_windows
    if device.type == "cuda" and not args.masked_windows and not args.no_fa3:
        print(f"FlashAttention-3: {model_module.use_fa3() or 'loaded'}")
    if args.fp8:
        min_dim = recipe.knobs(None)["fp8_min_dim"]  # the newest recipe, whose model this is
        converted, skipped = train.convert_fp8(model, "tensorwise", min_dim, emulate=device.type == "cpu")
        print(f"fp8: {len(converted)} Linear layers converted, skipped: {', '.join(skipped) or 'none'}")
    tokens = args.grad_accum * args.device_batch_size * args.max_seq_len
    use_compile, why = runtime.compile_decision(args.compile, device.type,  # as train decides, for these steps
                                                model.estimate_flops() * tokens * (args.warmup + args.steps))
    step_model = torch.compile(model, dynamic=False) if use_compile else model
    flags = train.parse_args([f"--depth={args.depth}", f"--max-seq-len={args.max_seq_len}",
                              f"--device-batch-size={args.device_batch_size}",
                              f"--total-batch-size={args.grad_accum * args.device_batch_size * args.max_seq_len}"])
    optimizer = train.make_optimizer(model, train.resolve(flags, args.vocab_size, 1),
                                     compiled=use_compile)  # as train does
    x = torch.randint(0, args.vocab_size, (args.device_batch_size, args.max_seq_len + 1), device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    def micro_step():
        with autocast:
            loss = step_model(x[:, :-1], x[:, 1:])
        (loss / args.grad_accum).backward()

    def optimizer_step():
        optimizer.step()
        model.zero_grad(set_to_none=True)

    def step():
        for _ in range(args.grad_accum):
            micro_step()
        optimizer_step()

    for _ in range(args.warmup):
        step()
    seconds = timed(step, device, args.steps)
    micro = timed(micro_step, device, args.steps)  # forward and backward alone: the ceiling
    model.zero_grad(set_to_none=True)
    flops = model.estimate_flops() * tokens / seconds
    rows = args.device_batch_size * args.max_seq_len
    reference = matmul_flops(config, rows, device, dtype, max(3, args.steps))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = train.peak_flops(device)
    print(f"device {name}, d{args.depth} (dim {config.n_embd}), {tokens} tokens/step, "
          f"{'fp8' if args.fp8 else str(dtype).removeprefix('torch.')}, compile={use_compile} ({why}), "
          f"attention: {model.window_kernel(device)} (torch {torch.__version__}); allocator: {allocator}")
    print(f"train: {seconds * 1000:.1f} ms/step ({args.grad_accum} x forward+backward, then the optimizer), "
          f"{tokens / seconds:,.0f} tok/s, {flops / 1e12:.3f} TFLOP/s")
    optimizer_seconds = max(0.0, seconds - args.grad_accum * micro)
    # a rank of an N-GPU run does 1/N of the optimizer's work (MuonAdamW splits it); collectives not counted
    as_rank = tokens / (args.grad_accum * micro + optimizer_seconds / args.ranks)
    print(f"forward+backward alone: {micro * 1000:.1f} ms, {rows / micro:,.0f} tok/s; optimizer "
          f"{optimizer_seconds * 1000:.1f} ms/step; as one of {args.ranks} ranks (1/{args.ranks} of the optimizer, "
          f"collectives not counted): {as_rank:,.0f} tok/s")
    print(f"reference matmul ({rows}x{config.n_embd} @ {config.n_embd}x{4 * config.n_embd}): "
          f"{reference / 1e12:.3f} TFLOP/s")
    print(f"ratio train/matmul FLOP/s: {flops / reference:.3f}")
    if peak:
        print(f"MFU vs {peak / 1e12:.0f} TFLOP/s bf16 peak: {100 * flops / peak:.1f}%")
    if device.type == "cuda" and ("h100" in name.lower() or "h200" in name.lower()) and args.depth == 26:
        ref = NANOCHAT_D26_H100[args.fp8]  # an H200 has the H100's bf16/fp8 peak, with faster memory
        print(f"vs nanochat d26 on H100 ({ref / 1e3:.1f}K tok/s per GPU of 8): {tokens / seconds / ref:.3f}"
              f" -> {'MET' if tokens / seconds > ref else 'NOT MET'} (this GPU doing the whole optimizer); "
              f"as one of {args.ranks} ranks: {as_rank / ref:.3f}")
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
