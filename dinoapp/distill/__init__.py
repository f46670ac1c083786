"""Distillation: compress a large (frozen) backbone into one or several smaller students (DINOv3 spec, section 4).

``distill(config, out_dir, data=..., teacher=...)`` runs it (``dinoapp distill`` on the command line);
``evaluate_backbones`` compares teacher and students on a labelled probe.
"""

from .config import DistillConfig, load_distill_config
from .evaluate import EvalReport, evaluate_backbones
from .train import DistillResult, distill

__all__ = ["DistillConfig", "DistillResult", "EvalReport", "distill", "evaluate_backbones", "load_distill_config"]
