"""``dinoapp pretrain``: self-supervised (continued) pretraining from the command line.

    dinoapp pretrain --config cpu-smoke --data FOLDER --out RUN_DIR [section.key=value ...]
    dinoapp pretrain --out RUN_DIR --resume                  # continue from the folder alone
    torchrun --nproc_per_node=8 -m dinoapp pretrain --config vitl16-continue-8gpu --data ... --out ...
"""

from __future__ import annotations

import argparse
import logging
import os


def _pretrain(args: argparse.Namespace) -> None:
    from .ssl.config import load_config
    from .ssl.train import pretrain

    if args.list_presets:
        from .ssl.config import preset_names

        print("\n".join(preset_names()))
        return
    cfg = args.config
    if args.print_config:
        print(load_config(cfg, args.overrides).to_yaml())
        return
    if args.out is None:
        raise SystemExit("dinoapp pretrain: --out RUN_DIR is required")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if cfg is None and not args.resume:
        raise SystemExit("dinoapp pretrain: pass --config NAME_OR_FILE (see --list-presets), or --resume")
    result = pretrain(cfg, args.out, data=args.data, overrides=args.overrides or None,
                      resume=True if args.resume else "auto" if cfg is None else False,
                      stop_after=args.stop_after)  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
        return
    if result.stopped_early:
        print(f"stopped at step {result.step}; continue with: dinoapp pretrain --out {result.run_dir} --resume")
    else:
        print(f"finished {result.step} steps in {result.run_dir}")
        for kind, path in result.exported.items():
            print(f"exported teacher ({kind}): {path}")


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="self-supervised (continued) pretraining: DINO + iBOT + KoLeo on a folder of unlabelled images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="preset name (see --list-presets) or YAML file")
    p.add_argument("--data", default=None, help="folder (or file) of images, GeoTIFFs, DICOMs")
    p.add_argument("--out", default=None, help="run folder: config, checkpoints, metrics, export")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="checkpoint and exit after N steps of this call (split a run across time-limited jobs)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--list-presets", action="store_true", help="list the shipped presets and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-4 train.steps=500")
    p.set_defaults(func=_pretrain)
