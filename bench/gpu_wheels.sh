#!/usr/bin/env bash
# Wheels of what the lent GPU image lacks, for bench/gpu_check.sh: that image's python3 (3.12) holds
# CUDA torch, numpy, pandas, pyarrow, tiktoken, yaml and pytest, but not torchao, rustbpe or
# jsonschema, and it cannot reach PyPI. Run here (with PyPI), then pass `carry: [".whl"]` to the device.
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -o "\"$1==[^\"]*\"" pyproject.toml | tr -d '"'; }
wheels=("$(pin torchao)" "$(pin rustbpe)" "$(pin jsonschema)"
        # jsonschema's own needs (attrs and typing-extensions are in the image), as scripts/setup resolves them
        jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1)
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${wheels[@]}"
ls -l .whl
