"""The CUDA path of the train stage: bf16 autocast, torch.compile, fp8 (Hopper+) and NCCL under torchrun.

Skipped without a GPU; bench/gpu_check.sh runs it on a lent device."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO
from pipeline import evaluate, launch, plan, train
from pipeline.model import GPT, GPTConfig, flash_windows_supported

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (bench/gpu_check.sh runs this on a lent device)")


def test_cuda_training_compiles_and_runs_fp8(smoke_data, tmp_path):
    p = smoke_data["plan"]
    smoke = p.specs[p.rows["smoke"]["train"][0]]
    fp8 = torch.cuda.get_device_capability() >= (8, 9)
    params = {**smoke["params"], "device_type": "cuda", "depth": 4, "max_seq_len": 512, "device_batch_size": 8,
              "total_batch_size": 8192, "num_iterations": 30, "eval_every": 15, "save_every": 15, "fp8": fp8}
    spec = plan.make_spec("train", params, smoke["inputs"],
                          settings={"row": "gpu", "launch": {"nproc_per_node": 1, "nodes": 1}})
    inputs = [smoke_data["root"] / "store" / r for r in spec["inputs"]]
    out, work = tmp_path / "out", tmp_path / "work"
    torchrun = f"{sys.executable} -m torch.distributed.run"
    cmd = launch.train_command(spec, inputs, out, work).replace("torchrun", torchrun)
    # keep any PYTHONPATH already set: on the lent device it holds the wheels bench/gpu_check.sh installed
    env = {**os.environ, "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "train_summary.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert losses[-1] < losses[0] - 0.5
    # MFU against the card's dense bf16 peak: a card in train's table must get one, from the measured rate
    peak = train.peak_flops(torch.device("cuda"))
    assert (summary["mfu"] is None) == (peak is None), (summary["device"], summary["mfu"])
    if peak is not None:
        flops = json.loads((out / "manifest.json").read_text())["resolved"]["flops_per_token"]
        assert 0 < summary["mfu"] < 100
        assert summary["mfu"] == pytest.approx(100 * flops * summary["tok_per_sec"] / peak)
    assert summary["device"].lower().startswith("nvidia")
    assert bool(summary["fp8_layers"]["converted"]) == fp8
    fa3 = "attention: FlashAttention-3" in proc.stderr  # where HuggingFace `kernels` can load it (Hopper)
    assert summary["window_attention"] == ("fa3" if fa3 else "flash" if flash_windows_supported() else "masked")
    assert fa3 or "FlashAttention-3 not used: " in proc.stderr  # and if not, it says why


@pytest.mark.parametrize("recipe", ["348fbb3", "92d63d4"])  # AdamW in bf16 itself / in fp32, stored back
def test_embeddings_are_bf16_on_cuda_as_nanochats(recipe):
    """nanochat keeps wte and the value embeddings in bf16 on CUDA (and their AdamW moments), so the
    residual stream is bf16; the block matrices and the scalars stay fp32 master weights."""
    from helpers import tiny_hp
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(2, 512, 64, recipe=recipe))
    model.to_empty(device="cuda")
    model.init_weights()
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert all(e.weight.dtype == torch.bfloat16 for e in model.value_embeds.values())
    assert model.lm_head.weight.dtype == torch.float32 and model.resid_lambdas.dtype == torch.float32
    x = torch.randint(0, 512, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert model.trunk(x).dtype == torch.bfloat16
        loss = model(x, x)
    loss.backward()
    opt = train.make_optimizer(model, tiny_hp(512, recipe))
    before = model.transformer.wte.weight.detach().clone()
    opt.step()
    assert opt.state[model.transformer.wte.weight]["exp_avg"].dtype == torch.bfloat16
    assert not torch.equal(before, model.transformer.wte.weight)


def test_batches_reach_the_gpu_intact_through_pinned_memory():
    rows = np.arange(4 * 10, dtype=np.int64).reshape(4, 10)
    arrays = (rows[:, :-1], np.full((4, 9), -1, dtype=np.int64))  # a strided view, as the loader's inputs
    x, y = evaluate.batch_to(arrays, torch.device("cuda"))
    assert x.is_cuda and y.is_cuda
    assert np.array_equal(x.cpu().numpy(), arrays[0]) and np.array_equal(y.cpu().numpy(), arrays[1])


def test_flash_windows_compute_what_the_mask_does():
    """The real FlashAttention window against SDPA with the mask, loss and gradients, under bf16 autocast."""
    if not flash_windows_supported():
        pytest.skip(f"torch {torch.__version__} has no varlen_attn(window_size=...), or this GPU is older than "
                    "sm80: short windows stay masked")
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=512, vocab_size=512, n_layer=2, n_head=2, n_embd=256,
                          window_pattern="SL")).cuda()
    model.init_weights()
    with torch.no_grad():  # away from init, where zeroed projections would hide attention
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, y = (torch.randint(0, 512, (4, 512), device="cuda") for _ in range(2))

    def loss_and_grads(flash):
        model.flash_windows = flash
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        return loss.item(), [p.grad.float().clone() for p in model.parameters()]

    masked_loss, masked_grads = loss_and_grads(False)
    assert model.window_kernel(torch.device("cuda")) == "masked"
    flash_loss, flash_grads = loss_and_grads(True)
    assert model.window_kernel(torch.device("cuda")) == "flash"
    assert flash_loss == pytest.approx(masked_loss, rel=2e-3)
    for m, f in zip(masked_grads, flash_grads, strict=True):
        assert (f - m).norm() <= 3e-2 * m.norm() + 1e-8
