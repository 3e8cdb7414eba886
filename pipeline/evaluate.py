"""Measuring a model, shared by the train and core stages: bits per byte and greedy samples."""

import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline import tokenizer

# nanochat's base_eval prompts
SAMPLE_PROMPTS = ("The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is")


def autocast(device):
    """bf16 compute on CUDA (fp32 master weights stay as they are); plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def batch_to(arrays, device):
    """A loader's numpy batch on `device`. On CUDA through pinned memory: a copy from pageable memory
    makes the host wait for every kernel already queued, so the loader's next batch could not be
    packed, nor the next kernels launched, while the GPU works."""
    # the loader's inputs are a strided view (rows of seq_len + 1): made contiguous, the pinned copy
    # goes to the GPU as one DMA instead of through a pageable staging copy
    tensors = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    if device.type == "cuda":
        tensors = (t.pin_memory() for t in tensors)  # the caching host allocator keeps it until copied
    return tuple(t.to(device, non_blocking=True) for t in tensors)


def token_bytes(enc, tok_dir, convention="raw"):
    """Bytes each token id stands for (0 for special tokens), the denominator of bits per byte.
    "raw": the token's own bytes (the tokenizer's token_bytes.npy; nanochat from 2ce972a). "decoded":
    the UTF-8 length of the token decoded alone, as nanochat's tok_train measured it before: a token that
    is not valid UTF-8 by itself decodes to U+FFFD, 3 bytes (193 of nanochat's 32768 tokens differ)."""
    raw = np.load(Path(tok_dir) / "token_bytes.npy")
    if convention == "raw":
        return torch.from_numpy(raw)
    decoded = raw.copy()
    for i in np.flatnonzero(raw):
        decoded[i] = len(enc.decode([int(i)]).encode("utf-8"))
    return torch.from_numpy(decoded)


@torch.no_grad()
def evaluate_bpb(model, loader, steps, token_bytes, world):
    """Bits per byte: summed loss (nats) over tokens that stand for bytes, over ln 2 x their bytes."""
    device = token_bytes.device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(steps):
        x, y = batch_to(next(loader), device)
        with autocast(device):
            loss = model(x, y, loss_reduction="none").view(-1)
        y = y.view(-1)
        b = torch.where(y >= 0, token_bytes[y.clamp_min(0)], 0)
        nats += (loss.double() * (b > 0)).sum()
        nbytes += b.sum()
    if world > 1:
        for t in (nats, nbytes):
            dist.all_reduce(t)
    return float(nats / (math.log(2) * nbytes)) if nbytes > 0 else float("inf")


@torch.no_grad()
def greedy_samples(model, enc, device, tokens=16):
    """{prompt: the model's greedy continuation} for SAMPLE_PROMPTS."""
    out = {}
    bos = enc.encode_single_token(tokenizer.BOS)
    for prompt in SAMPLE_PROMPTS:
        prefix = [bos] + enc.encode_ordinary(prompt)
        ids = list(prefix)
        for _ in range(tokens):
            with autocast(device):
                logits = model(torch.tensor([ids[-model.config.sequence_len:]], device=device))
            ids.append(int(logits[0, -1].argmax()))
        out[prompt] = enc.decode(ids[len(prefix):])
    return out
