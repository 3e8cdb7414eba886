#!/usr/bin/env bash
# What only a GPU can show, as one short script for a lent device (one H100/H200, ~10 minutes):
# nanochat's own base_train beside our train stage at d26 and d12, bf16 and fp8 (same flags, same data,
# one after the other: "do we beat 78.8K / 92.5K tok/s per H100" with both numbers from this machine),
# the CUDA path trains (bf16 autocast, torch.compile, fp8, NCCL under torchrun), tok/s + MFU of the bare
# step, CORE examples/s, and d26 with masked short windows (what FlashAttention's window buys).
# Figures go to bench/gpu_out, or on the lent device to /tmp/gpu_check, packed at the end (the small files:
# logs, results.json, no checkpoints) into $OUT/gpu_check.tgz, since only 8 files 2 folders deep come back
# from there. Copy the figures to bench/README.md. On the lent device: run bench/gpu_wheels.sh here first,
# then one call:  run(command="bash bench/gpu_check.sh", carry=[".whl", ".nanochat"], timeout_s=600)
set -uo pipefail
export WANDB_MODE=disabled PYTHONUNBUFFERED=1  # no wandb import: the GPU image has none
cd "$(dirname "$0")/.."
back=${OUT:-}  # set on the lent device: what is written under it comes back
out=${back:+/tmp/gpu_check}
out=${out:-bench/gpu_out}
mkdir -p "$out"
pack() {  # the small files of $out into $OUT/gpu_check.tgz, whatever step the script ended at
    [ -n "$back" ] && (cd "$out" && find . -type f -size -4M ! -name '*.pt' ! -name '*.npy' ! -name '*.parquet' \
        ! -name '*.bin' | tar czf "$back/gpu_check.tgz" -T -)
}
trap pack EXIT
if [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else  # the lent device: its python3 holds CUDA torch; what it lacks travels as wheels (bench/gpu_wheels.sh)
    py=python3
    if compgen -G ".whl/*.whl" > /dev/null; then
        $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    # stage commands say `python -m pipeline.<stage>`; the image may have only python3
    command -v python > /dev/null || { mkdir -p /tmp/pybin; ln -sf "$(command -v python3)" /tmp/pybin/python
                                       export PATH=/tmp/pybin:$PATH; }
fi
$py -c "import torch, torchao, rustbpe, jsonschema; print('torch', torch.__version__, 'torchao', torchao.__version__,
      'cuda', torch.cuda.is_available())" 2>&1 | tee "$out/versions.txt"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
# One device call may run 10 minutes: every step gets at most what is left of BUDGET seconds, most
# telling first (the leaderboard's d26 rows, then the train stage itself), so a slow compile costs the
# last steps, not the whole call.
deadline=$((SECONDS + ${BUDGET:-540}))  # 540 s of steps, then the pack, inside a 600 s call
run_for() {  # run_for CAP LOG CMD...: CMD under timeout min(CAP, time left); skipped under 30 s left
    local cap=$1 log=$2 left=$((deadline - SECONDS)); shift 2
    (( left < 30 )) && { echo "skipped (budget spent): $*" > "$log"; return; }
    local limit=$(( cap < left ? cap : left ))
    timeout $limit "$@" > "$log" 2>&1
    local rc=$?
    (( rc == 124 )) && echo "timed out after $limit s: $*" >> "$log"
    return $rc
}
throughput() {  # throughput DEPTH DEVICE_BATCH [FLAG]: bench/train_throughput.py, one line of figures
    local tag=${3:-bf16}; tag=${tag#--}
    local log="$out/throughput_d$1_$tag.txt"
    run_for 150 "$log" $py bench/train_throughput.py --depth "$1" --device-batch-size "$2" ${3:-} --steps 10
    echo "d$1 $tag: $(grep -E 'attention:|FlashAttention-3|tok/s|MFU|nanochat|budget spent|timed out|Error' "$log" | tr '\n' ' ')"
}
# nanochat imports wandb at its top (unused with --run=dummy); a stub where the image has none
stubs=/tmp/nanochat-stubs
mkdir -p $stubs
$py -c "import wandb" 2> /dev/null || : > $stubs/wandb.py
side_by_side() {  # side_by_side DEPTH DEVICE_BATCH [--fp8]: train_throughput.py --nanochat; 65536-token steps (the
    # fixture shards hold ~3M tokens: 25 steps fit)
    local tag=${3:-bf16}; tag=${tag#--}
    local log="$out/side_by_side_d$1_$tag.txt"
    [ -f .nanochat/COMMIT ] || { echo "no .nanochat (bench/gpu_wheels.sh makes it)" > "$log"; return; }
    PYTHONPATH=$stubs${PYTHONPATH:+:$PYTHONPATH} run_for 330 "$log" $py bench/train_throughput.py \
        --nanochat .nanochat --recipe "$(cat .nanochat/COMMIT)" --data tests/fixtures/webtext --depth "$1" \
        --device-batch-size "$2" --max-seq-len 2048 --total-batch-size 65536 --window-pattern SSSL --head-dim 128 \
        --run-steps 25 --out "$out/side_by_side" ${3:-}
    echo "side by side d$1 $tag: $(grep -E 'tok/s|ratio|goal|budget spent|timed out|Error' "$log" | tr '\n' ' ')"
    # both sides' d26 weights and optimizer states are ~20 GB a run: the 64 GB disk holds two runs at most
    find "$out/side_by_side" -name '*.pt' -delete 2> /dev/null
}
side_by_side 26 16 --fp8  # the leaderboard's d26 rows train in fp8
# the train stage on CUDA under torchrun (NCCL), compile, fp8, resuming; FlashAttention's window
run_for 240 "$out/test_gpu.txt" $py -m pytest -q tests/test_gpu.py
tail -3 "$out/test_gpu.txt"
# CORE examples/s, batched against one item per forward pass (issue 4), on a d26-sized model
run_for 90 "$out/core_throughput.txt" $py bench/core_throughput.py --depth 26 --seq-len 2048 --items 40
grep -E 'examples|speed-up|budget spent|timed out|Error' "$out/core_throughput.txt"
side_by_side 26 16
side_by_side 12 32 --fp8
side_by_side 12 32
throughput 26 16 --fp8
throughput 26 16
throughput 26 16 --masked-windows  # what FlashAttention's window buys over the mask
