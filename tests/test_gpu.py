"""The CUDA path of the train stage: bf16 autocast, torch.compile, fp8 (Hopper+) and NCCL under torchrun.

Skipped without a GPU; bench/gpu_check.sh runs it on a lent device."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from pipeline import launch, plan

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
    assert summary["mfu"] is None or summary["mfu"] > 0
    assert summary["device"].lower().startswith("nvidia")
    assert bool(summary["fp8_layers"]["converted"]) == fp8
