#!/usr/bin/env bash
# GPU check for a lent CUDA machine: the gpu-marked tests (extraction, dense windows, scenes with the
# reader thread, bf16 autocast, SSL losses/fused AdamW), the extraction benchmark and the pretraining step
# loop and the distillation step on CUDA. Budget: under 5 minutes on one H100.
# Usage (repo root, torch/timm already importable): bash benchmarks/gpu_smoke.sh
set -euo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m pytest -q -m gpu tests
python benchmarks/extract.py --device cuda --batch 64 --sizes 224 512 --repeats 10
python benchmarks/extract.py --device cuda --arch vitl16 --batch 32 --sizes 224 512 --repeats 5
# Pretraining step loop (bf16 autocast, fused AdamW): ViT-S and ViT-L, spec crops, img/s, peak memory, MFU.
python benchmarks/train_step.py --device cuda --models vits16 vitl16 --batch 32 --global-size 224 --local-size 96 \
    --n-local 8 --prototypes 65536 --steps 8 --warmup 3
python benchmarks/train_step.py --device cuda --models vits16 --batch 64 --global-size 224 --local-size 96 \
    --n-local 8 --prototypes 65536 --steps 8 --warmup 4 --compile
# Distillation: ViT-L teacher -> ViT-S + ConvNeXt-T students, one shared teacher pass vs two single-student runs.
python benchmarks/distill_step.py --device cuda --teacher vitl16 --students vits16 timm:convnext_tiny --batch 64 \
    --global-size 224 --local-size 96 --n-local 4 --steps 6
