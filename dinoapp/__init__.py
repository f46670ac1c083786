"""dinoapp: adapt DINOv3 vision foundation models to your own imagery.

Start with :func:`load_backbone`, :func:`preprocess` and :func:`extract`; dense maps at any size with
:func:`dense_features` / :func:`scene_features`, pictures with :mod:`dinoapp.viz`. Backbones are DINOv3
ViTs (:class:`DinoBackbone`) or any timm model with a dense feature map (:class:`TimmBackbone`, e.g.
``load_backbone("timm:convnext_tiny")`` as a distillation student).
"""

from . import heads, metrics, viz
from .arch import ARCHS, ArchSpec
from .backbone import LVD_MEAN, LVD_STD, SAT_MEAN, SAT_STD, DinoBackbone, expand_input_channels
from .cache import FeatureCache
from .checkpoint import save_backbone
from .dense import DenseFeatures, SceneMap, dense_features, scene_features
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    DinoappError,
    HeadBackboneMismatchError,
    HubUnavailableError,
    InputError,
    SourceNotFoundError,
    UnknownSourceError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from .extract import Features, extract
from .heads import (
    ForegroundClassifier,
    KNNClassifier,
    LinearSegHead,
    LogisticClassifier,
    SegHead,
    fit_foreground,
    fit_seg_head,
    image_embedding,
    load_head,
    save_head,
)
from .identity import backbone_fingerprint, backbone_identity
from .loading import load_backbone
from .predict import segment_scene
from .preprocess import preprocess, to_tensor
from .timm_backbone import TimmArch, TimmBackbone

__version__ = "0.1.0"

__all__ = [
    "ARCHS",
    "ArchSpec",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "ConfigError",
    "DinoBackbone",
    "DenseFeatures",
    "DinoappError",
    "FeatureCache",
    "ForegroundClassifier",
    "HeadBackboneMismatchError",
    "KNNClassifier",
    "LinearSegHead",
    "LogisticClassifier",
    "SegHead",
    "Features",
    "HubUnavailableError",
    "InputError",
    "LVD_MEAN",
    "LVD_STD",
    "SAT_MEAN",
    "SAT_STD",
    "SceneMap",
    "SourceNotFoundError",
    "TimmArch",
    "TimmBackbone",
    "UnknownSourceError",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "backbone_fingerprint",
    "backbone_identity",
    "dense_features",
    "expand_input_channels",
    "extract",
    "fit_foreground",
    "fit_seg_head",
    "heads",
    "image_embedding",
    "load_head",
    "metrics",
    "save_head",
    "segment_scene",
    "load_backbone",
    "preprocess",
    "save_backbone",
    "scene_features",
    "to_tensor",
    "viz",
]
