#!/usr/bin/env bash
# Writes the images' lock files from pyproject.toml: every package pinned, with the sha256 of each
# of its files (uv pip compile --generate-hashes), for Python 3.11 on Linux x86_64 (the Dockerfile's
# python:3.11-slim on amd64). The Dockerfile installs them with pip --require-hashes.
#
#   gateway.lock       the gateway image: the base dependencies, no torch
#   worker.lock        the worker image: [worker], torch the CPU build
#   worker-llama.lock  the worker image with EXTRAS=worker,llama
#   torch-cpu.lock     torch alone, installed first from PyTorch's CPU index (its line in worker.lock)
#
# Everything but torch comes from PyPI. torch==2.13.0+cpu exists only on PyTorch's CPU index: its
# wheels are read from TORCH_WHEELS, that index's torch page by default (a folder holding the wheel
# works too). Needs uv (pip install uv). Run it after changing a dependency in pyproject.toml:
#   bash requirements/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_WHEELS=${TORCH_WHEELS:-https://download.pytorch.org/whl/cpu/torch/}

lock() {
    local out=$1; shift
    uv pip compile --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
        --index-url https://pypi.org/simple --find-links "$TORCH_WHEELS" --no-emit-find-links \
        --custom-compile-command "bash requirements/lock.sh" --no-cache \
        pyproject.toml requirements/image.in "$@" -o "requirements/$out"
}
lock gateway.lock
lock worker.lock --extra worker requirements/torch-cpu.in
lock worker-llama.lock --extra worker --extra llama requirements/torch-cpu.in
# torch's entry alone: its line and the hash lines after it.
{
    echo "# torch alone, from PyTorch's CPU index (the Dockerfile: pip install --no-deps --require-hashes"
    echo "# --index-url https://download.pytorch.org/whl/cpu). Written by requirements/lock.sh from worker.lock."
    awk '/^torch==/ {on = 1} on && /^[^ ]/ && !/^torch==/ {on = 0} on && !/^ *#/' requirements/worker.lock
} > requirements/torch-cpu.lock
