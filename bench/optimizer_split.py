"""MuonAdamW's step split over N processes against the same step in one process.

Under torch.distributed each rank runs Muon on its own share of the matrices only (gradients
reduce-scattered, updated weights all-gathered), so a rank's step should take well under one process's
step, less what the collectives cost. reference (measured in the same run): the step of one process
holding the whole model. ratio = a rank's step / that reference (1/N is the ideal, for Muon's share).

    .venv/bin/python bench/optimizer_split.py --depth 6 --nproc 2          # CPU (gloo), one thread each
    .venv/bin/python bench/optimizer_split.py --depth 26 --nproc 8         # 8 GPUs (NCCL)
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # measure this checkout
from pipeline import train  # noqa: E402
from pipeline.model import GPT, GPTConfig  # noqa: E402


def step_seconds(rank, world, args, rendezvous, results):
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if not cuda:  # one core per rank, and one for the reference: the same work per core
        torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{rendezvous}", rank=rank,
                                world_size=world, **({"device_id": device} if cuda else {}))
    flags = train.parse_args([f"--depth={args.depth}", f"--max-seq-len={args.max_seq_len}"])
    hp = train.resolve(flags, args.vocab_size, 1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**hp["model"])).to(device)
    model.init_weights()
    optimizer = train.make_optimizer(model, hp, compiled=cuda)  # as train does on CUDA
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    times = []
    for i in range(args.warmup + args.steps):
        if world > 1:
            dist.barrier()
        sync()
        t0 = time.perf_counter()
        optimizer.step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    results[rank] = sorted(times)[len(times) // 2]  # median
    if world > 1:
        dist.destroy_process_group()


def measure(world, args):
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        rendezvous = os.path.join(tmp, "rendezvous")
        if world == 1:
            step_seconds(0, 1, args, rendezvous, results)
        else:
            mp.spawn(step_seconds, args=(world, args, rendezvous, results), nprocs=world)
    return max(results.values())  # the step ends when its slowest rank does


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    reference = measure(1, args)
    split = measure(args.nproc, args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"d{args.depth} on {device}: one process {reference * 1000:.1f} ms/step; split over {args.nproc}: "
          f"{split * 1000:.1f} ms/step; ratio {split / reference:.2f} (ideal for Muon's share: "
          f"{1 / args.nproc:.2f})")
    print(f"goal: a rank's step faster than one process's (ratio < 1) -> {'MET' if split < reference else 'NOT MET'}")


if __name__ == "__main__":
    main()
