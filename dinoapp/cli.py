"""Command line: ``dinoapp info|convert|archs`` (backbones) and ``dinoapp extract|pca|similarity|fit-head|predict``
(dense features, maps and heads; see :mod:`dinoapp.cli_dense`) and ``dinoapp pretrain``
(:mod:`dinoapp.cli_train`)."""

from __future__ import annotations

import argparse
import sys

from .errors import DinoappError


def _info(args: argparse.Namespace) -> None:
    from .arch import describe
    from .loading import load_backbone

    bb = load_backbone(args.source, num_heads=args.num_heads)
    if getattr(bb.arch, "family", None) == "timm":
        n = sum(p.numel() for p in bb.parameters())
        print(f"timm {bb.arch.model_name}, feature stage {bb.arch.out_index} (stride {bb.patch_size}, "
              f"{bb.embed_dim} channels), in_chans {bb.in_chans}, {n / 1e6:.1f}M params")  # fmt: skip
    else:
        print(describe(bb.arch))
    print(f"mean {tuple(round(m, 4) for m in bb.mean)}  std {tuple(round(s, 4) for s in bb.std)}")
    for k, v in bb.provenance.items():
        print(f"{k}: {v}")
    if bb.pretrained_heads:
        print("heads: " + ", ".join(f"{n} ({len(h)} tensors)" for n, h in bb.pretrained_heads.items()))


def _convert(args: argparse.Namespace) -> None:
    from .checkpoint import save_backbone
    from .loading import load_backbone

    bb = load_backbone(args.source, num_heads=args.num_heads)
    path = save_backbone(bb, args.out)
    print(f"wrote {path}")


def _archs(args: argparse.Namespace) -> None:
    from .arch import ARCHS, TIMM_NAMES, describe

    timm_of = {v: k for k, v in TIMM_NAMES.items()}
    for name, arch in ARCHS.items():
        extra = f"  (timm: {timm_of[name]})" if name in timm_of else ""
        print(f"{name:16s} {describe(arch)}{extra}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dinoapp", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="load a backbone and print its architecture and provenance")
    p.add_argument("source", help="checkpoint file/folder, architecture name or timm name")
    p.add_argument("--num-heads", type=int, default=None)
    p.set_defaults(func=_info)
    p = sub.add_parser("convert", help="convert any supported checkpoint to a dinoapp checkpoint")
    p.add_argument("source")
    p.add_argument("out", help="output path (.safetensors or .pt)")
    p.add_argument("--num-heads", type=int, default=None)
    p.set_defaults(func=_convert)
    p = sub.add_parser("archs", help="list the known architectures")
    p.set_defaults(func=_archs)
    from .cli_dense import add_parsers
    from .cli_distill import add_parsers as add_distill_parsers
    from .cli_train import add_parsers as add_train_parsers

    add_parsers(sub)
    add_train_parsers(sub)
    add_distill_parsers(sub)
    args = parser.parse_args(argv)
    from domains.errors import DomainError

    try:
        args.func(args)
    except (DinoappError, DomainError, OSError) as e:  # OSError: an unwritable --out, a folder as a file, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
