"""Pretrained DINOv3 weights by timm name (``vit_small_patch16_dinov3.lvd1689m`` ...).

timm hosts the released DINOv3 ViTs on the Hugging Face hub without access gating. We ask
timm's registry where a name's weights live, fetch the file with ``huggingface_hub`` (which uses
its local cache and honours ``HF_HUB_OFFLINE``) and load it like any other timm-layout file, so the
architecture is read from the weights (a ``_qkvb`` file keeps its q/v biases).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import HubUnavailableError, UnknownSourceError

DEFAULT_FILENAME = "model.safetensors"


def split_timm_name(source: str) -> tuple[str, str | None] | None:
    """``'vit_small_patch16_dinov3.lvd1689m'`` -> (model, tag); None if it is not a timm DINOv3 ViT."""
    name, _, tag = source.partition(".")
    if not (name.startswith("vit_") and "dinov3" in name):
        return None
    return name, (tag or None)


def resolve(source: str) -> tuple[str, str, str]:
    """(hub repo id, file name, tag) for a timm DINOv3 name; the default tag when none is given."""
    import timm
    from timm.models import get_pretrained_cfg

    parts = split_timm_name(source)
    if parts is None or parts[0] not in timm.list_models("*dinov3*"):
        known = ", ".join(timm.list_pretrained("vit_*dinov3*"))
        raise UnknownSourceError(f"{source!r} is not a timm DINOv3 ViT. Pretrained names: {known}")
    name, tag = parts
    try:
        cfg = get_pretrained_cfg(f"{name}.{tag}" if tag else name)
    except RuntimeError:
        cfg = None
    if cfg is None or not cfg.hf_hub_id:
        known = ", ".join(timm.list_pretrained(f"{name}.*"))
        raise UnknownSourceError(f"timm has no pretrained weights {source!r}; available: {known or 'none'}")
    return cfg.hf_hub_id, cfg.hf_hub_filename or DEFAULT_FILENAME, cfg.tag or ""


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def fetch(source: str, *, cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Local path of the weights of a timm DINOv3 name (downloading once when online) and its tag."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    repo, filename, tag = resolve(source)
    cache = str(Path(cache_dir).expanduser()) if cache_dir is not None else None
    cached = try_to_load_from_cache(repo, filename, cache_dir=cache)
    if isinstance(cached, str) and Path(cached).is_file():
        return Path(cached), tag
    where = cache or constants.HF_HUB_CACHE
    advice = (
        f"On a machine with internet run `dinoapp info {source}` once to fill the cache ({where}), or "
        f"download {filename} from the hub repo {repo} and pass its path to load_backbone."
    )
    if constants.HF_HUB_OFFLINE:
        raise HubUnavailableError(f"{source} is not in the local cache and HF_HUB_OFFLINE is set. {advice}")
    if not _hub_reachable():
        raise HubUnavailableError(f"{source} is not in the local cache and the hub cannot be reached. {advice}")
    try:
        return Path(hf_hub_download(repo, filename, cache_dir=cache)), tag
    except Exception as e:  # network errors come in many types
        raise HubUnavailableError(f"downloading {source} failed ({type(e).__name__}: {e}). {advice}") from None
