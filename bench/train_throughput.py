"""Training throughput of pipeline.train's step: tok/s and MFU for one depth on this device.

reference (measured in the same run): one dense matmul of the model's MLP shape, in the training dtype:
the FLOP/s this device really delivers. ratio = the training step's FLOP/s / that matmul's FLOP/s.
MFU against the datasheet bf16 peak is printed too where the GPU is known (nanochat's definition), and
on an H100 at d26 the tok/s against nanochat's reported 78.8K (bf16) / 92.5K (fp8) per GPU.
A step is --grad-accum forward+backward passes and one optimizer step, as in a leaderboard run (an
optimizer step per pass would charge Muon's orthogonalisation 4x as often as a run does).

    .venv/bin/python bench/train_throughput.py --depth 26 --device-batch-size 16 [--fp8]
    .venv/bin/python bench/train_throughput.py --depth 2 --max-seq-len 256 --device-batch-size 8   # CPU
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # measure this checkout
from pipeline import model as model_module  # noqa: E402
from pipeline import recipe, train  # noqa: E402
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--device-batch-size", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=2048)
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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
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
    use_compile = args.compile == "yes" or (args.compile == "auto" and device.type == "cuda")
    step_model = torch.compile(model, dynamic=False) if use_compile else model
    flags = train.parse_args([f"--depth={args.depth}", f"--max-seq-len={args.max_seq_len}",
                              f"--device-batch-size={args.device_batch_size}",
                              f"--total-batch-size={args.grad_accum * args.device_batch_size * args.max_seq_len}"])
    optimizer = train.make_optimizer(model, train.resolve(flags, args.vocab_size, 1),
                                     compiled=use_compile and device.type == "cuda")  # as train does
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
    tokens = args.grad_accum * args.device_batch_size * args.max_seq_len
    flops = model.estimate_flops() * tokens / seconds
    rows = args.device_batch_size * args.max_seq_len
    reference = matmul_flops(config, rows, device, dtype, max(3, args.steps))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = train.peak_flops(device)
    print(f"device {name}, d{args.depth} (dim {config.n_embd}), {tokens} tokens/step, "
          f"{'fp8' if args.fp8 else str(dtype).removeprefix('torch.')}, compile={use_compile}, "
          f"attention: {model.window_kernel(device)} (torch {torch.__version__})")
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
