"""Self-supervised (continued) pretraining: DINO + iBOT + KoLeo (DINOv3 spec, section 2).

``pretrain(config, out_dir, data=...)`` runs or resumes a run; ``load_config`` builds a config from
a preset or YAML file plus ``section.key=value`` overrides. See :mod:`dinoapp.ssl.train`.
"""

from .config import PretrainConfig, load_config, preset_names
from .train import CollapseWarning, RunResult, TrainingDivergedError, pretrain

__all__ = ["CollapseWarning", "PretrainConfig", "RunResult", "TrainingDivergedError", "load_config", "pretrain",
           "preset_names"]  # fmt: skip
