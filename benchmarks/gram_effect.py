"""What Gram anchoring does to dense features: the same continued-pretraining job with and without it.

CPU-sized by default (10-20 minutes on 2 cores): the repo's 4-band Sentinel-2 and RGBN aerial samples
are cut into 64 px tiles (RGB PNGs to train on; vegetation labels from NDVI, a band the RGB model never
sees, for the monitor's linear probe), a tiny ViT is pretrained from scratch on them (stage A), then
training continues from that checkpoint twice (stage B): without Gram anchoring, and with the stage-A
weights as a fixed Gram teacher. The dense-feature monitor logs, every few steps, on the same 8 probe
tiles: Gram distance to the stage-A weights, patch locality, effective rank, vegetation probe mIoU.

    python benchmarks/gram_effect.py --out /tmp/gram_effect            # CPU default
    python benchmarks/gram_effect.py --out runs/ge --steps-a 2000 --steps-b 2000 --device cuda

Prints a table of the monitor's numbers at the end of stage B and writes ``gram_effect.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import domains  # noqa: E402
from domains import samples  # noqa: E402

KEYS = ("dense_gram_distance", "dense_locality", "dense_rank", "probe_miou", "loss")


def make_tiles(out: Path, tile: int = 64) -> tuple[Path, Path]:
    """RGB tiles (PNG) and NDVI > 0.3 vegetation label tiles of the multispectral samples."""
    from PIL import Image

    data, labels = out / "tiles", out / "labels"
    data.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for name, red, nir in (("sentinel2", 3, 4), ("aerial", 1, 4)):
        path = samples.path(name)
        rgb, _ = domains.load(path, bands="rgb")  # [3, H, W] in [0, 1] (auto stretch)
        raw, _ = domains.load(path, bands=[red, nir], stretch="none")  # [2, H, W] raw values
        ndvi = (raw[1] - raw[0]) / np.maximum(raw[1] + raw[0], 1e-6)
        H, W = ndvi.shape
        for y in range(0, H - tile + 1, tile // 2):
            for x in range(0, W - tile + 1, tile // 2):
                stem = f"{name}_{y:04d}_{x:04d}"
                img = (rgb[:, y : y + tile, x : x + tile].transpose(1, 2, 0) * 255).round().astype(np.uint8)
                Image.fromarray(img).save(data / f"{stem}.png")
                veg = (ndvi[y : y + tile, x : x + tile] > 0.3).astype(np.uint8)
                Image.fromarray(veg).save(labels / f"{stem}.png")
    return data, labels


def run(cfg_overrides: list[str], out: Path, data: Path) -> list[dict]:
    from dinoapp.ssl import pretrain

    pretrain("cpu-smoke", out, data=data, overrides=cfg_overrides, resume="auto")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps-a", type=int, default=300, help="stage A: pretraining from scratch")
    ap.add_argument("--steps-b", type=int, default=300, help="stage B: continued, with and without Gram")
    ap.add_argument("--every", type=int, default=25, help="monitor interval")
    ap.add_argument("--gram-weight", type=float, default=2.0)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    data, labels = make_tiles(out)
    n_tiles = len(list(data.glob("*.png")))
    common = ["run.progress=false", f"train.device={args.device}", "model.arch_overrides.depth=4",
              "data.global_size=64", "data.local_size=32", "data.n_local=4", "train.batch_size=16",
              "data.domain=satellite", f"monitor.every={args.every}", "monitor.n_probes=8",
              f"monitor.labels={labels}", "run.ckpt_every=100000"]  # fmt: skip
    print(f"{n_tiles} tiles of 64 px; stage A {args.steps_a} steps, stage B {args.steps_b} steps x 2")
    run([*common, f"train.steps={args.steps_a}", "optim.warmup_steps=30", "loss.teacher_temp_warmup_steps=100",
         "optim.freeze_last_layer_steps=20"], out / "stage_a", data)  # fmt: skip
    start = out / "stage_a" / "export" / "teacher_backbone.safetensors"
    cont = [*common, f"model.backbone={start}", "model.arch_overrides={}", f"train.steps={args.steps_b}",
            "optim.schedule=constant", "optim.lr=2e-4", "optim.warmup_steps=10", "optim.freeze_last_layer_steps=0",
            "loss.teacher_temp_warmup_steps=0", "loss.teacher_temp_start=0.07", "optim.ema_momentum=0.95",
            "optim.ema_momentum_end=0.99"]  # fmt: skip  # short runs: a teacher that moves
    curves = {
        "no Gram": run(cont, out / "no_gram", data),
        "Gram (fixed, stage-A weights)": run([*cont, "gram.enabled=true", "gram.teacher=init",
                                              f"gram.weight={args.gram_weight}"], out / "gram", data),  # fmt: skip
    }
    print(f"\n{'run':32s}" + "".join(f"{k:>22s}" for k in KEYS))
    for name, rows in curves.items():
        dense = [r for r in rows if "dense_locality" in r]
        last = dense[-1]
        print(f"{name:32s}" + "".join(f"{last.get(k, float('nan')):22.4f}" for k in KEYS))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install dinoapp[ml]): no plot")
        return
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    for ax, key in zip(axes, KEYS[:4]):
        for name, rows in curves.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*pts), marker="o", ms=3, label=name)
        ax.set_title(key)
        ax.set_xlabel("step (stage B)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gram_effect.png", dpi=110)
    print(f"plot: {out / 'gram_effect.png'}")


if __name__ == "__main__":
    main()
