#!/usr/bin/env bash
# What bench/gpu_check.sh needs that the lent GPU image lacks, made here (with PyPI): wheels in .whl/
# (that image's python3 (3.12) holds CUDA torch, numpy, pandas, pyarrow, tiktoken, yaml and pytest, but
# not torchao, rustbpe or jsonschema, and it cannot reach PyPI), and nanochat's source at the commit the
# side-by-side compares with in .nanochat/ (from a clone or mirror: NANOCHAT_GIT, default the team's
# mirror; NANOCHAT_COMMIT, default 92d63d4 = master). Then pass `carry: [".whl", ".nanochat"]`.
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
git_dir=${NANOCHAT_GIT:-/work/.mirror/karpathy+nanochat/repo}
rm -rf .nanochat && mkdir .nanochat
git --git-dir "$git_dir" archive "${NANOCHAT_COMMIT:-92d63d4}" nanochat scripts tasks pyproject.toml | tar -x -C .nanochat
echo "${NANOCHAT_COMMIT:-92d63d4}" > .nanochat/COMMIT
du -sh .nanochat
