"""Training-step throughput: dinoapp's pretraining step vs a minimal baseline step, in the same run.

The baseline is written here from scratch: the same backbone and heads, the same crops, a plain
DINO loss (teacher softmax with centering, no Sinkhorn-Knopp), one AdamW param group, gradient
clipping and an EMA teacher. Our step is ``dinoapp.ssl.train.Engine.step`` (schedules, parameter
groups, masks, Sinkhorn-Knopp, NaN guard, ...), timed twice: with the same objective as the
baseline (iBOT and KoLeo weights 0: the engine's overhead) and with the full DINO + iBOT + KoLeo
objective (what a real run costs), and with Gram anchoring on top (a fixed Gram teacher that sees the
same crops at 2x). Steps alternate between the variants so machine noise hits all.

    python benchmarks/train_step.py                 # tiny and ViT-S on this machine (CPU: fp32)
    python benchmarks/train_step.py --models vits16 --batch 32 --global-size 224 --local-size 96 --n-local 8
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinoapp.ssl import dist as D  # noqa: E402
from dinoapp.ssl.config import load_config  # noqa: E402
from dinoapp.ssl.train import autocast_context, build_engine, uses_bf16  # noqa: E402


class Baseline:
    """Plain DINO step: student/teacher backbone + DINO head, centering, AdamW, clip, EMA."""

    def __init__(self, nets, device, lr=1e-4, fused=None):
        self.student = copy.deepcopy(nets).to(device).train()
        self.teacher = copy.deepcopy(self.student).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.04, fused=fused)
        self.center = None
        self.device = device

    def step(self, batch, precision="fp32"):
        dev = self.device
        gc = batch["global_crops"].to(dev).flatten(0, 1)  # [2B, C, g, g]
        lc = batch["local_crops"].to(dev).flatten(0, 1)  # [LB, C, l, l]
        G, B = batch["global_crops"].shape[:2]
        with autocast_context(dev, precision):
            with torch.no_grad():
                t = self.teacher.dino_head(self.teacher.backbone(gc)).float()  # [2B, K]
                if self.center is None:
                    self.center = t.mean(0, keepdim=True)
                p_t = F.softmax((t - self.center) / 0.04, -1).reshape(G, B, -1)  # [G, B, K]
                self.center = 0.9 * self.center + 0.1 * t.mean(0, keepdim=True)
            s = self.student.dino_head(torch.cat([self.student.backbone(gc), self.student.backbone(lc)])).float()
        logp = F.log_softmax(s / 0.1, -1).reshape(-1, B, s.shape[-1])  # [G+L, B, K]
        loss, n = 0.0, 0
        for i in range(logp.shape[0]):
            for j in range(G):
                if i != j:
                    loss = loss - (p_t[j] * logp[i]).sum(-1).mean()
                    n += 1
        loss = loss / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 3.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            tp, sp = list(self.teacher.parameters()), list(self.student.parameters())
            torch._foreach_mul_(tp, 0.996)
            torch._foreach_add_(tp, sp, alpha=0.004)
        return float(loss.detach())


def crops(n_batches, B, C, g, lsz, L, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"global_crops": torch.randn(2, B, C, g, g, generator=gen),
             "local_crops": torch.randn(L, B, C, lsz, lsz, generator=gen)} for _ in range(n_batches)]  # fmt: skip


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense bf16


def vit_flops(arch, n_tokens: int) -> float:
    """Forward FLOPs of the ViT trunk for one image of ``n_tokens`` tokens (matmuls + attention)."""
    D, F, n = arch.embed_dim, arch.ffn_hidden, n_tokens
    mlp = (3 if arch.ffn == "swiglu" else 2) * 2 * n * D * F
    per_block = 2 * n * D * 3 * D + 2 * n * D * D + mlp + 4 * n * n * D
    return arch.depth * per_block


def step_flops(arch, B, g, lsz, L) -> float:
    """Model FLOPs of one step: student fwd+bwd (3x) on 2 global + L local crops, teacher fwd on 2 globals."""
    reg = 1 + arch.n_registers
    fg = vit_flops(arch, (g // arch.patch_size) ** 2 + reg)
    fl = vit_flops(arch, (lsz // arch.patch_size) ** 2 + reg)
    return B * (3 * (2 * fg + L * fl) + 2 * fg)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def run(model: str, args, dev: torch.device) -> dict:
    overrides = {
        "model.backbone": model,
        "model.n_prototypes": args.prototypes,
        "model.drop_path": 0.0,
        "model.arch_overrides": {"depth": args.depth} if args.depth else {},
        "model.head_hidden": 2048,
        "model.head_bottleneck": 256,
        "model.rope_rescale": None,
        "data.global_size": args.global_size,
        "data.local_size": args.local_size,
        "data.n_local": args.n_local,
        "train.batch_size": args.batch,
        "train.steps": 10**6,
        "train.precision": args.precision,
        "train.compile": args.compile,
        "train.device": dev.type,
        "optim.warmup_steps": 0,
        "optim.lr": 1e-4,
    }
    info = D.DistInfo(device=dev)
    variants = {}
    gram = {"gram.enabled": True, "gram.teacher": "init", "gram.weight": 2.0, "gram.highres": 2.0}
    for name, extra in (("ours (DINO only)", {"loss.ibot_weight": 0.0, "loss.koleo_weight": 0.0}),
                        ("ours (DINO+iBOT+KoLeo)", {}),
                        ("ours + Gram (2x crops)", gram)):  # fmt: skip
        cfg = load_config("cpu-smoke", {**overrides, **extra})
        variants[name] = build_engine(cfg, info)
    base = Baseline(variants["ours (DINO only)"].nets, dev, fused=True if dev.type == "cuda" else None)
    batches = crops(4, args.batch, 3, args.global_size, args.local_size, args.n_local)
    gen = torch.Generator().manual_seed(1)
    gram_batches = [{**b, "gram_crops": torch.randn(2, args.batch, 3, 2 * args.global_size, 2 * args.global_size,
                                                    generator=gen)} for b in batches]  # fmt: skip
    prec = "bf16" if uses_bf16(dev, args.precision) else "fp32"
    fns = {"baseline (plain DINO)": lambda i: base.step(batches[i % 4], prec)}
    for name, eng in variants.items():
        data = gram_batches if "Gram" in name else batches
        fns[name] = lambda i, eng=eng, data=data: eng.step(i, data[i % 4])
    times = {k: [] for k in fns}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for it in range(args.warmup + args.steps):
        for k, fn in fns.items():
            sync(dev)
            t0 = time.perf_counter()
            fn(it)
            sync(dev)
            if it >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    out = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        out[k] = {"s_per_step": med, "img_per_s": args.batch / med}
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    arch = variants["ours (DINO only)"].nets.backbone.arch
    flops = step_flops(arch, args.batch, args.global_size, args.local_size, args.n_local)
    for v in out.values():
        v["tflops"] = flops / v["s_per_step"] / 1e12
    return {"model": model, "rows": out, "peak_gib": peak, "params": sum(p.numel() for p in base.student.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_tiny", "vits16"])
    ap.add_argument("--depth", type=int, default=0, help="override the depth (0: the architecture's)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--global-size", type=int, default=112)
    ap.add_argument("--local-size", type=int, default=48)
    ap.add_argument("--n-local", type=int, default=4)
    ap.add_argument("--prototypes", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dev = D.pick_device(args.device)
    torch.manual_seed(0)
    peak_tflops = args.peak_tflops
    if dev.type == "cuda" and peak_tflops is None:
        name = torch.cuda.get_device_name(dev)
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    print(f"device {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"crops 2x{args.global_size} + {args.n_local}x{args.local_size}, K {args.prototypes}")  # fmt: skip
    for m in args.models:
        r = run(m, args, dev)
        base = r["rows"]["baseline (plain DINO)"]["s_per_step"]
        print(f"\n{m} ({r['params'] / 1e6:.1f}M params incl. heads)"
              + (f", peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] else ""))  # fmt: skip
        print(f"{'variant':28s} {'s/step':>8s} {'img/s':>8s} {'vs baseline':>12s} {'TFLOP/s':>8s} {'MFU':>6s}")
        for k, v in r["rows"].items():
            mfu = f"{100 * v['tflops'] / peak_tflops:5.1f}%" if peak_tflops else "   n/a"
            print(f"{k:28s} {v['s_per_step']:8.3f} {v['img_per_s']:8.1f} {v['s_per_step'] / base:11.2f}x "
                  f"{v['tflops']:8.2f} {mfu}")  # fmt: skip


if __name__ == "__main__":
    main()
