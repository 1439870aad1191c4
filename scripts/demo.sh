#!/usr/bin/env bash
# Install zqcompile and run the main job: compile a real pretrained model and report accuracy and memory.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install.sh
python3 examples/quickstart.py "$@"
