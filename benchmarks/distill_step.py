"""Distillation step time: two students sharing one teacher pass vs two single-student runs, same run.

Three engines (``dinoapp.distill.train.DistillEngine.step``) on the same batches: student A alone,
student B alone, and A + B together (one teacher forward per step for both). The baseline is the
sum of the two single-student step times (what two separate runs cost); the ratio shows what
sharing the teacher pass saves. Steps alternate between the engines so machine noise hits all.

    python benchmarks/distill_step.py     # CPU defaults (fp32): ViT-S teacher, tiny ViT + ConvNeXt students
    python benchmarks/distill_step.py --teacher vitl16 --students vits16 timm:convnext_tiny --batch 64 \\
        --global-size 224 --local-size 96 --n-local 4          # on a GPU (bf16)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinoapp.distill.config import load_distill_config  # noqa: E402
from dinoapp.distill.train import build_engine  # noqa: E402
from dinoapp.ssl import dist as D  # noqa: E402

TINY = {"vit_tiny": {"depth": 4}, "timm:convnext_atto": {"out_index": 2}}


def student(i: int, src: str) -> dict:
    return {"name": f"s{i}", "backbone": src, "arch_overrides": TINY.get(src, {})}


def make_batch(args, teacher_size: int, local_size: int, gen: torch.Generator) -> dict:
    B = args.batch
    return {"global_crops": torch.randn(2, B, 3, teacher_size, teacher_size, generator=gen),
            "local_crops": torch.randn(args.n_local, B, 3, local_size, local_size, generator=gen)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="vits16", help="teacher source (random init for an arch name)")
    ap.add_argument("--students", nargs=2, default=["vit_tiny", "timm:convnext_atto"])
    ap.add_argument("--mode", default="features", choices=("features", "heads", "both"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--global-size", type=int, default=112)
    ap.add_argument("--local-size", type=int, default=48)
    ap.add_argument("--n-local", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per engine (after 2 warm-up steps)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    info = D.init(args.device)
    if info.device.type == "cpu":  # as distill() does on CPU: denormals in a fresh student's Adam state stall x86 CPUs
        torch.set_flush_denormal(True)

    def cfg_for(students: list[dict]):
        cfg = load_distill_config("distill-cpu-smoke", {
            "teacher.backbone": args.teacher, "loss.mode": args.mode, "data.global_size": args.global_size,
            "data.local_size": args.local_size, "data.n_local": args.n_local, "train.batch_size": args.batch,
            "train.steps": 1000, "train.device": args.device, "train.precision": "auto",
            "students": students})  # fmt: skip
        return cfg

    a, b = student(0, args.students[0]), student(1, args.students[1])
    engines = {"A alone": build_engine(cfg_for([a]), info), "B alone": build_engine(cfg_for([b]), info),
               "A + B shared": build_engine(cfg_for([a, b]), info)}  # fmt: skip
    eng0 = engines["A alone"]
    from dinoapp.distill.train import teacher_sizes

    tsize, lsize = teacher_sizes(eng0.cfg, eng0.teacher, eng0.features_on_locals)
    gen = torch.Generator().manual_seed(0)
    batches = [make_batch(args, tsize, lsize, gen) for _ in range(args.steps + 2)]
    times: dict[str, list[float]] = {k: [] for k in engines}
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    for i, batch in enumerate(batches):
        for name, eng in engines.items():  # round-robin
            sync()
            t0 = time.perf_counter()
            eng.step(i, batch)
            sync()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    teacher_t = []
    x = batches[0]["global_crops"].flatten(0, 1).to(info.device)
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        eng0.teacher.forward(x)
        sync()
        teacher_t.append(time.perf_counter() - t0)
    tmed = statistics.median(teacher_t)
    baseline = med["A alone"] + med["B alone"]
    print(f"device {info.device}, teacher {args.teacher}, students {args.students}, mode {args.mode}, batch "
          f"{args.batch}, crops 2x{args.global_size} + {args.n_local}x{args.local_size} (teacher {tsize})")  # fmt: skip
    print(f"{'engine':<16}{'s/step':>10}{'img/s':>10}")
    for k, v in med.items():
        print(f"{k:<16}{v:>10.3f}{args.batch / v:>10.1f}")
    print(f"{'teacher fwd':<16}{tmed:>10.3f}   (global crops only)")
    shared = med["A + B shared"]
    print(f"two single-student runs (baseline): {baseline:.3f} s/step; shared teacher pass: {shared:.3f} s/step = "
          f"{shared / baseline:.2f}x the baseline ({baseline / shared:.2f}x faster)")
    if args.json:
        Path(args.json).write_text(json.dumps({"median_s": med, "teacher_forward_s": tmed, "baseline_s": baseline}))


if __name__ == "__main__":
    main()
