#!/usr/bin/env bash
# What only a GPU can show, as one short script for a lent device (one H100/H200, ~10 minutes):
# the CUDA path trains (bf16 autocast, torch.compile, fp8, NCCL under torchrun), and tok/s + MFU for
# d12 and d26, bf16 and fp8. Output goes to $OUT (or bench/gpu_out); copy the figures to bench/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/gpu_out}
mkdir -p "$out"
py=.venv/bin/python
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
for cfg in "12 32" "26 16"; do
    set -- $cfg
    for fp8 in "" "--fp8"; do
        timeout 240 $py bench/train_throughput.py --depth "$1" --device-batch-size "$2" $fp8 --steps 10 \
            > "$out/throughput_d$1${fp8:+_fp8}.txt" 2>&1
        echo "d$1 ${fp8:-bf16}: $(grep -E 'tok/s|MFU|nanochat' "$out/throughput_d$1${fp8:+_fp8}.txt" | tr '\n' ' ')"
    done
done
# the training stage itself on CUDA, under torchrun (NCCL), resuming from a checkpoint
WANDB_MODE=disabled timeout 300 $py -m pytest -q -x tests/test_gpu.py > "$out/test_gpu.txt" 2>&1
tail -3 "$out/test_gpu.txt"
