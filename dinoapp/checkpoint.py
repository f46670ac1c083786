"""Reading checkpoint files safely, and dinoapp's own backbone checkpoint format.

Every ``.pth``/``.pt``/``.bin`` file goes through ``torch.load(weights_only=True)``: a pickle that
would run code is refused with :class:`UnsafeCheckpointError`. ``.safetensors`` files are read with
safetensors. A folder is read as a Hugging Face model folder (``model.safetensors`` or sharded
``model.safetensors.index.json``, ``config.json``, ``preprocessor_config.json``).

dinoapp backbone checkpoint (format ``dinoapp.backbone``), written by :func:`save_backbone` and
by training runs, one record per backbone kind:

- a DINOv3 ViT (:class:`~dinoapp.backbone.DinoBackbone`), version 1::

    {"dinoapp_format": "dinoapp.backbone", "version": 1,
     "arch": ArchSpec.to_dict(), "state_dict": Meta-layout tensors (mask token, RoPE periods),
     "mean": [...], "std": [...], "provenance": {...}, "heads": {name: state dict}}

- any timm model (:class:`~dinoapp.timm_backbone.TimmBackbone`), version 2::

    {"dinoapp_format": "dinoapp.backbone", "version": 2,
     "arch": {"family": "timm", "model_name", "out_index", "in_chans", "model_kwargs"},
     "state_dict": the module's own state dict (timm's under "model.", the trainable norm under "norm."),
     "mean", "std", "provenance", "heads"}

``version`` is the oldest reader that understands the record: ViT records stay at 1, so any
dinoapp release reads them; timm records are 2, so a dinoapp from before timm backbones says
"upgrade dinoapp" instead of misreading them. :data:`VERSION` is the newest version this dinoapp
reads. Records without ``arch["family"]`` are ViTs.

As ``.safetensors`` the tensors are stored flat (heads under ``heads.<name>.``) and the rest as
JSON in the file's metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    SourceNotFoundError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)

FORMAT = "dinoapp.backbone"
VERSION = 2  # the newest record version this dinoapp reads
VIT_VERSION = 1  # written for DinoBackbone records (readable by every dinoapp release)
TIMM_VERSION = 2  # written for TimmBackbone records
FAMILIES = ("vit", "timm")  # arch["family"]; absent = "vit"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


@dataclass
class RawCheckpoint:
    """What a file or folder held, before any layout conversion."""

    obj: dict[str, Any]  # the loaded mapping (state dict, teacher dump or dinoapp checkpoint)
    path: Path
    sha256: str | None
    config: dict[str, Any] = field(default_factory=dict)  # HF config.json, if any
    preprocessor: dict[str, Any] = field(default_factory=dict)  # HF preprocessor_config.json


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sha256_files(paths: list[Path]) -> str:
    if len(paths) == 1:
        return sha256_file(paths[0])
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def torch_load_safe(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with the library's errors for unsafe or broken files."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e).lower():
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights only" in msg.lower() or "weights_only" in msg.lower() or "GLOBAL" in msg:
            # torch names the culprit, e.g. "Trying to load unsupported GLOBAL posix.system ..."
            culprit = re.search(r"[^\n]*unsupported[^\n]*", msg, flags=re.IGNORECASE)
            first = culprit.group(0) if culprit else "objects torch refuses to unpickle"
            raise UnsafeCheckpointError(
                f"{path} contains pickled objects other than tensors (possibly code), so it was not loaded "
                f"({first[:200]}). Only load files you trust; to convert a trusted file, load it yourself and "
                "save its state dict with torch.save(model.state_dict(), ...)."
            ) from None
        raise CheckpointCorruptError(f"{path} is not a readable checkpoint: {msg[:200]}") from None
    except (EOFError, zipfile.BadZipFile) as e:
        raise CheckpointCorruptError(f"{path} is truncated or damaged ({type(e).__name__}: {e})") from None
    except Exception as e:  # the unpickler fails on damaged bytes with many exception types
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointCorruptError(
            f"{path} is truncated or not a PyTorch checkpoint ({type(e).__name__}: {first})"
        ) from None


def _load_safetensors(paths: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    sd: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for p in paths:
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                meta.update(f.metadata() or {})
                for k in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    sd[k] = f.get_tensor(k)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointCorruptError(f"{p} is truncated or not a safetensors file ({e})") from None
    return sd, meta


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointCorruptError(f"{path} is not valid JSON ({e})") from None


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """Read a checkpoint file or Hugging Face model folder into a :class:`RawCheckpoint`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SourceNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        return _read_folder(path)
    if path.suffix == ".safetensors":
        sd, meta = _load_safetensors([path])
        obj = _from_safetensors_metadata(sd, meta) if meta.get("dinoapp_format") else sd
        return RawCheckpoint(obj, path, sha256_file(path))
    if path.suffix == ".json":
        raise UnsupportedFormatError(f"{path} is a JSON file; pass the model file or its folder instead")
    obj = torch_load_safe(path)
    if not isinstance(obj, dict):
        raise UnsupportedFormatError(
            f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead"
        )
    return RawCheckpoint(obj, path, sha256_file(path))


def _read_folder(path: Path) -> RawCheckpoint:
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif index.is_file():
        index_json = _read_json(index)
        weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointCorruptError(f"{index} has no valid 'weight_map' of tensor name -> shard file")
        shards = sorted(set(weight_map.values()))
        files = [path / s for s in shards]
        missing = [str(f) for f in files if not f.is_file()]
        if missing or not files:
            raise CheckpointCorruptError(f"{index} lists shards that are not there: {missing[:4]}")
    else:
        found = sorted(p.name for p in path.iterdir())[:10]
        torch_files = [path / n for n in ("pytorch_model.bin",) if (path / n).is_file()]
        if torch_files:
            obj = torch_load_safe(torch_files[0])
            return RawCheckpoint(obj, path, sha256_file(torch_files[0]), _read_json(path / "config.json"),
                                 _read_json(path / "preprocessor_config.json"))  # fmt: skip
        raise SourceNotFoundError(
            f"{path} is a folder without model.safetensors, model.safetensors.index.json or pytorch_model.bin "
            f"(it holds {found})"
        )
    sd, _ = _load_safetensors(files)
    return RawCheckpoint(
        sd,
        path,
        _sha256_files(files),
        _read_json(path / "config.json"),
        _read_json(path / "preprocessor_config.json"),
    )


def _from_safetensors_metadata(sd: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, Any]:
    try:
        info = json.loads(meta["dinoapp"])
    except (KeyError, ValueError) as e:
        raise CheckpointCorruptError(f"dinoapp safetensors metadata is damaged ({e})") from None
    heads: dict[str, dict[str, torch.Tensor]] = {}
    state = {}
    for k, v in sd.items():
        if k.startswith("heads."):
            name, rest = k[len("heads.") :].split(".", 1)
            heads.setdefault(name, {})[rest] = v
        else:
            state[k] = v
    return {**info, "dinoapp_format": meta["dinoapp_format"], "state_dict": state, "heads": heads}


def backbone_record(backbone) -> dict[str, Any]:
    """The dinoapp checkpoint dict of a backbone (plain types only, so it loads with ``weights_only=True``):
    a :class:`~dinoapp.backbone.DinoBackbone` stores Meta-layout weights, a
    :class:`~dinoapp.timm_backbone.TimmBackbone` its own state dict (see the module docstring)."""
    prov = {k: v for k, v in backbone.provenance.items() if isinstance(v, (str, int, float, bool, type(None)))}
    arch = backbone.arch.to_dict()
    if arch.get("family") == "timm":
        version = TIMM_VERSION
        state = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
    else:
        version = VIT_VERSION
        state = {k: v.contiguous() for k, v in backbone.meta_state_dict().items()}
    return {
        "dinoapp_format": FORMAT,
        "version": version,
        "arch": arch,
        "state_dict": state,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "provenance": prov,
        "heads": {n: dict(h) for n, h in backbone.pretrained_heads.items()},
    }


def save_backbone(backbone, path: str | os.PathLike) -> Path:
    """Write ``backbone`` as a dinoapp checkpoint (``.safetensors`` or a torch file, by suffix).
    The file records architecture, normalisation and provenance, so ``load_backbone(path)`` gives
    back an identical model."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = backbone_record(backbone)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = dict(rec["state_dict"])
        for name, h in rec["heads"].items():
            flat.update({f"heads.{name}.{k}": v.contiguous() for k, v in h.items()})
        flat = _unshared(flat)
        info = {k: rec[k] for k in ("version", "arch", "mean", "std", "provenance")}
        save_file(flat, str(tmp), metadata={"dinoapp_format": FORMAT, "dinoapp": json.dumps(info)})
    else:
        torch.save(rec, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint under the real name
    return path


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give each later alias its own copy."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.device.index or 0) if v.numel() else (id(v), -1)
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def check_record(obj: dict[str, Any], path: Path) -> None:
    if obj.get("dinoapp_format") != FORMAT:
        raise UnsupportedFormatError(f"{path}: unknown dinoapp format {obj.get('dinoapp_format')!r}")
    if int(obj.get("version", 0)) > VERSION:
        raise UnsupportedFormatError(
            f"{path} was written by a newer dinoapp (format version {obj.get('version')}); upgrade dinoapp"
        )
    for key in ("arch", "state_dict"):
        if key not in obj:
            raise CheckpointError(f"{path}: dinoapp checkpoint without {key!r}")
    record_family(obj, path)


def record_family(obj: dict[str, Any], path: Path | str = "the checkpoint") -> str:
    """``"vit"`` or ``"timm"``: which backbone a dinoapp record holds (``arch["family"]``, absent = ViT)."""
    arch = obj.get("arch")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{path}: dinoapp checkpoint whose 'arch' is not a dict ({type(arch).__name__})")
    family = arch.get("family", "vit")
    if family not in FAMILIES:
        raise UnsupportedFormatError(
            f"{path} holds a backbone of family {family!r}, which this dinoapp does not know "
            f"(it knows {', '.join(FAMILIES)}); upgrade dinoapp"
        )
    return family
