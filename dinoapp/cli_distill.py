"""``dinoapp distill`` / ``dinoapp distill-eval``: compress a large backbone into smaller students.

dinoapp distill --config distill-cpu-smoke --data FOLDER --out RUN [section.key=value ...]
dinoapp distill --config distill-l-to-s --teacher ADAPTED.safetensors --data FOLDER --out RUN
dinoapp distill --out RUN --resume                     # continue from the folder alone
torchrun --nproc_per_node=8 -m dinoapp distill --config distill-l-to-s --data ... --out ...
dinoapp distill-eval --teacher T --student s=RUN/students/s/backbone.safetensors --labels probe.csv
"""

from __future__ import annotations

import argparse
import logging
import os


def _distill(args: argparse.Namespace) -> None:
    from .distill.config import distill_preset_names, load_distill_config
    from .distill.train import distill

    if args.list_presets:
        print("\n".join(distill_preset_names()))
        return
    if args.print_config:
        cfg = load_distill_config(args.config, args.overrides)
        if args.teacher:
            cfg.teacher.backbone = args.teacher
        print(cfg.to_yaml())
        return
    if args.out is None:
        raise SystemExit("dinoapp distill: --out RUN_DIR is required")
    if args.config is None and not args.resume:
        raise SystemExit("dinoapp distill: pass --config NAME_OR_FILE (see --list-presets), or --resume")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = distill(args.config, args.out, data=args.data, teacher=args.teacher, overrides=args.overrides or None,
                     resume=True if args.resume else "auto" if args.config is None else False,
                     stop_after=args.stop_after)  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if result.stopped_early:
        print(f"stopped at step {result.step}; continue with: dinoapp distill --out {result.run_dir} --resume")
        return
    print(f"finished {result.step} steps in {result.run_dir}")
    for name, path in result.exported.items():
        print(f"exported student {name}: {path}")
    if result.evaluation:
        print(result.evaluation["table"])
        for name, a in result.evaluation["agreement"].items():
            print(f"{name} vs teacher: " + ", ".join(f"{k} {v:.3f}" for k, v in a.items()))


def _distill_eval(args: argparse.Namespace) -> None:
    from .distill.evaluate import evaluate_backbones
    from .loading import load_backbone

    backbones = {"teacher": load_backbone(args.teacher, device=args.device)}
    for item in args.student:
        name, sep, src = item.partition("=")
        if not sep or not name or not src:
            raise SystemExit(f"dinoapp distill-eval: --student takes NAME=PATH, got {item!r}")
        backbones[name] = load_backbone(src, device=args.device)
    report = evaluate_backbones(backbones, labels_csv=args.labels, seg_images=args.seg_images,
                                seg_masks=args.seg_masks, size=args.size, k=args.k, device=args.device,
                                progress=True)  # fmt: skip
    print(report.table())
    if args.json:
        report.save(args.json)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="distil a (frozen) teacher backbone into one or several smaller students",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="preset name (see --list-presets) or YAML file")
    p.add_argument("--teacher", default=None, help="teacher backbone (sets teacher.backbone): file, timm or arch name")
    p.add_argument("--data", default=None, help="folder (or file) of unlabelled images, GeoTIFFs, DICOMs")
    p.add_argument("--out", default=None, help="run folder: config, checkpoints, metrics, students/<name>/, eval.json")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="checkpoint and exit after N steps of this call")  # fmt: skip
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--list-presets", action="store_true", help="list the shipped distillation presets and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. students.0.optim.lr=1e-4")
    p.set_defaults(func=_distill)

    p = sub.add_parser("distill-eval", help="compare backbones (teacher vs students): speed, kNN accuracy, seg mIoU")
    p.add_argument("--teacher", required=True, help="the reference backbone (first row, relative speed 1.0)")
    p.add_argument("--student", action="append", default=[], metavar="NAME=PATH", help="a backbone to compare")
    p.add_argument("--labels", default=None, help="CSV with columns path,label: kNN accuracy")
    p.add_argument("--seg-images", default=None, help="folder of images ...")
    p.add_argument("--seg-masks", default=None, help="... and label PNGs with the same stems: linear-seg mIoU")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.set_defaults(func=_distill_eval)
