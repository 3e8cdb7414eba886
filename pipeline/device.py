"""device: which device this process computes on, its rank, and the process group under torchrun.

Training and evaluation both start here, so that evaluating a model never imports the training stage.
"""

import os

import torch
import torch.distributed as dist

from pipeline import keylock, runtime
from pipeline.errors import StageError


def setup_device(device_type=""):
    """(device, rank, local_rank, world_size, what was done to the allocator); joins the process group when
    run under torchrun. `device_type` "" picks cuda when present."""
    keylock.die_with_launcher()
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    allocator = runtime.tune_allocators(device_type)
    if device_type == "cuda" and not torch.cuda.is_available():
        raise StageError("--device-type=cuda but no CUDA device is visible; use --device-type=cpu")
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0),
                                                                       ("WORLD_SIZE", 1)))
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device(device_type)
    if device_type == "cuda":
        torch.cuda.set_device(device)
    # joined once per process and kept for every target it runs (a seeded row is several): a group destroyed
    # and joined again under the same torchrun reuses the first one's rendezvous keys, so a rank can read
    # a peer's stale address and fail with "Connection refused"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                device_id=device if device_type == "cuda" else None)
    return device, rank, local_rank, world, allocator


def leave_process_group():
    """Once every target of this process is done (train and core's main): leave the group cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
