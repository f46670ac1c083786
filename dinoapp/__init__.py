"""dinoapp: adapt DINOv3 vision foundation models to your own imagery.

Start with :func:`load_backbone`, :func:`preprocess` and :func:`extract`.
"""

from .arch import ARCHS, ArchSpec
from .backbone import LVD_MEAN, LVD_STD, SAT_MEAN, SAT_STD, DinoBackbone, expand_input_channels
from .checkpoint import save_backbone
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    DinoappError,
    HubUnavailableError,
    InputError,
    SourceNotFoundError,
    UnknownSourceError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from .extract import Features, extract
from .loading import load_backbone
from .preprocess import preprocess, to_tensor

__version__ = "0.1.0"

__all__ = [
    "ARCHS",
    "ArchSpec",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "ConfigError",
    "DinoBackbone",
    "DinoappError",
    "Features",
    "HubUnavailableError",
    "InputError",
    "LVD_MEAN",
    "LVD_STD",
    "SAT_MEAN",
    "SAT_STD",
    "SourceNotFoundError",
    "UnknownSourceError",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "expand_input_channels",
    "extract",
    "load_backbone",
    "preprocess",
    "save_backbone",
    "to_tensor",
]
