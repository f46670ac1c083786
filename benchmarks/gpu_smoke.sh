#!/usr/bin/env bash
# GPU check for a lent CUDA machine: the gpu-marked tests (extraction, dense windows, scenes with the
# reader thread, bf16 autocast) and the extraction benchmark on CUDA.
# Usage (repo root, torch/timm already importable): bash benchmarks/gpu_smoke.sh
set -euo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m pytest -q -m gpu tests
python benchmarks/extract.py --device cuda --batch 64 --sizes 224 512 --repeats 10
python benchmarks/extract.py --device cuda --arch vitl16 --batch 32 --sizes 224 512 --repeats 5
