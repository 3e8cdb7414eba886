"""A torchrun worker for tests/test_slurm.py: joins the process group, sums ranks, says who it is."""

import os

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank()])
dist.all_reduce(total)  # really talks to the other ranks, not just to the rendezvous
print(f"rank {dist.get_rank()}/{dist.get_world_size()} sum={int(total)} "
      f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
dist.destroy_process_group()
