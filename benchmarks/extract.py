"""Throughput of dinoapp.extract against a plain timm forward_features of the same model.

Both run the same random ViT-S/16 (DINOv3 architecture) in the same process, fp32 on CPU
(bf16 autocast on CUDA), interleaved, median of repeats. Prints img/s and the ratio
extract / timm (>= 0.95 means the contract costs nothing measurable).

    python benchmarks/extract.py [--arch vits16] [--sizes 224 512] [--batch 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dinoapp
from dinoapp.extract import autocast_for


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vits16")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    bb = dinoapp.load_backbone(args.arch, seed=0, device=dev)
    vit = bb.vit  # the same timm Eva: the baseline is timm's own forward_features on it
    print(f"device {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}, {args.arch}")
    print(f"{'size':>5} {'batch':>5} {'timm img/s':>11} {'extract img/s':>14} {'ratio':>6}")
    for size in args.sizes:
        batch = args.batch if size <= 256 else max(1, args.batch // 4)
        pixels = torch.rand(batch, 3, size, size, device=dev)  # images in [0, 1]
        normed = dinoapp.preprocess(pixels, bb)

        def timm_fwd(normed=normed):
            with torch.inference_mode(), autocast_for(dev):
                vit.forward_features(normed)

        def ours(pixels=pixels, batch=batch):
            dinoapp.extract(bb, pixels, size=None, batch_size=batch, device=dev)

        t_timm, t_ours = [], []
        for _ in range(2):  # interleave to share thermal / load conditions
            t_timm.append(_time(timm_fwd, args.repeats))
            t_ours.append(_time(ours, args.repeats))
        a, b = batch / min(t_timm), batch / min(t_ours)
        print(f"{size:>5} {batch:>5} {a:>11.2f} {b:>14.2f} {b / a:>6.3f}")


if __name__ == "__main__":
    main()
