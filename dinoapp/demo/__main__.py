"""``python -m dinoapp.demo build [--out PATH] [--steps N] [--work-dir DIR]`` rebuilds the demo weights
from the ``demo-weights`` recipe; ``python -m dinoapp.demo info [PATH]`` prints where a demo weights
file came from (the shipped one by default)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import DEMO_NOTICE, DEMO_WEIGHTS, PRESET, build_demo_weights, provenance


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dinoapp.demo", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help=f"train the demo weights from scratch (pretraining preset {PRESET})")
    b.add_argument("--out", type=Path, default=DEMO_WEIGHTS, help=f"where to write them (default: {DEMO_WEIGHTS})")
    b.add_argument("--steps", type=int, default=None, help="train.steps (default: the preset's)")
    b.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep the training images and the run folder here (resumable; default: a temporary folder)",
    )
    b.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a further pretraining override, recorded in the file's provenance (repeatable)",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="print the provenance of the demo weights")
    i.add_argument("path", nargs="?", type=Path, default=DEMO_WEIGHTS)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    from ..errors import DinoappError

    try:
        if args.cmd == "build":
            build_demo_weights(args.out, steps=args.steps, work_dir=args.work_dir, progress=not args.quiet,
                               overrides=args.overrides)  # fmt: skip
            return 0
        prov = provenance(args.path)
    except DinoappError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(prov, indent=2))
        return 0
    data = json.loads(prov.get("data", "[]") or "[]")
    arch = prov.get("arch", {})
    size = Path(prov["path"]).stat().st_size / 2**20
    rows = [
        ("file", f"{prov['path']} ({size:.1f} MB)"),
        ("sha256", prov.get("sha256")),
        (
            "model",
            f"ViT dim {arch.get('embed_dim')}, {arch.get('depth')} blocks, {arch.get('num_heads')} heads, "
            f"patch {arch.get('patch_size')}",
        ),
        ("trained by", prov.get("source")),
        ("recipe", prov.get("recipe")),
        ("steps", prov.get("trained_steps", prov.get("steps"))),
        ("seed", prov.get("seed")),
        ("data", f"{len(data)} files: {', '.join(data)}"),
        ("data digest", prov.get("data_digest")),
        ("held out", prov.get("held_out")),
        ("dinoapp", prov.get("dinoapp_version")),
        ("torch", prov.get("torch_version")),
        ("rebuild", prov.get("command")),
        ("licence", prov.get("licence")),
    ]
    for k, v in rows:
        print(f"{k:>12}: {v}")
    print()
    print(DEMO_NOTICE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
