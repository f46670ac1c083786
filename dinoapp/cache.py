"""A feature cache so the app, the notebooks and the CLI never compute the same features twice.

Keys are built from the backbone's identity (:func:`dinoapp.identity.backbone_fingerprint`), the
preprocessing options and the input (the bytes of an array, or a file's path, size and
modification time), so a different model, resolution or image can never hit a stale entry.
Entries live in memory (LRU, bounded by ``max_bytes``) and optionally on disk (``disk_dir``, one
safetensors file per entry, written atomically), so a restarted app or notebook finds them again.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dense import DenseFeatures, dense_features
from .identity import backbone_fingerprint


def input_digest(image: Any) -> str:
    """A digest of an input: array/tensor bytes + shape + dtype, or a file's resolved path, size and mtime."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(image, str | os.PathLike):
        p = Path(image).resolve()
        st = p.stat()
        h.update(f"file:{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    elif hasattr(image, "convert") and hasattr(image, "mode"):  # PIL
        arr = np.asarray(image)
        h.update(f"pil:{image.mode}:{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    else:
        arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        h.update(f"array:{arr.shape}:{arr.dtype.str}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def make_key(fingerprint: str, options: dict[str, Any], digest: str) -> str:
    """The cache key of (backbone, preprocessing/extraction options, input)."""
    blob = json.dumps({"bb": fingerprint, "opts": options, "in": digest}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _nbytes(df: DenseFeatures) -> int:
    return sum(t.numel() * t.element_size() for t in [df.patches, df.cls, *df.layers.values()])


class FeatureCache:
    """LRU cache of :class:`~dinoapp.dense.DenseFeatures` in memory (``max_bytes``) and on disk (``disk_dir``).

    ``cache.features(backbone, image, **dense_options)`` returns cached features or computes them
    with :func:`dinoapp.dense.dense_features`. Thread-safe (the app serves several sessions).
    ``hits``/``misses`` count lookups.
    """

    def __init__(self, max_bytes: int = 2 * 2**30, disk_dir: str | os.PathLike | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self._mem: OrderedDict[str, DenseFeatures] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self._fp: dict[int, tuple[int, str]] = {}
        self.hits = 0
        self.misses = 0

    def fingerprint(self, backbone) -> str:
        """The backbone's fingerprint, memoised per object while its parameters' versions don't change."""
        version = sum(p._version for p in backbone.parameters())
        got = self._fp.get(id(backbone))
        if got is None or got[0] != version:
            got = (version, backbone_fingerprint(backbone))
            self._fp[id(backbone)] = got
        return got[1]

    def key(self, backbone, image: Any, **options: Any) -> str:
        opts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(options.items()) if k != "progress"}
        return make_key(self.fingerprint(backbone), opts, input_digest(image))

    def features(self, backbone, image: Any, *, loader: Callable[[Any], Any] | None = None, **options: Any):
        """Cached :func:`dense_features` of ``image`` (a path is read with ``loader``, e.g. ``domains.load``,
        and keyed by the file's identity, so the file is not even read on a hit)."""
        k = self.key(backbone, image, **options)
        got = self.get(k)
        if got is not None:
            return got
        src = image
        if isinstance(image, str | os.PathLike):
            if loader is None:
                raise TypeError("a path needs loader= (e.g. lambda p: domains.load(p)[0])")
            src = loader(image)
        df = dense_features(backbone, src, **options)
        self.put(k, df)
        return df

    def get(self, key: str) -> DenseFeatures | None:
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                self.hits += 1
                return self._mem[key]
        df = self._load(key)
        with self._lock:
            if df is None:
                self.misses += 1
                return None
            self.hits += 1
            self._remember(key, df)
            return df

    def put(self, key: str, df: DenseFeatures) -> None:
        with self._lock:
            self._remember(key, df)
        self._save(key, df)

    def clear(self, disk: bool = False) -> None:
        with self._lock:
            self._mem.clear()
            self._bytes = 0
        if disk and self.disk_dir is not None and self.disk_dir.exists():
            for f in self.disk_dir.glob("*.safetensors"):
                f.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._mem)

    def _remember(self, key: str, df: DenseFeatures) -> None:
        if key in self._mem:
            self._bytes -= _nbytes(self._mem.pop(key))
        self._mem[key] = df
        self._bytes += _nbytes(df)
        while self._bytes > self.max_bytes and len(self._mem) > 1:
            _, old = self._mem.popitem(last=False)
            self._bytes -= _nbytes(old)

    def _path(self, key: str) -> Path | None:
        return None if self.disk_dir is None else self.disk_dir / f"{key}.safetensors"

    def _save(self, key: str, df: DenseFeatures) -> None:
        path = self._path(key)
        if path is None:
            return
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"patches": df.patches.contiguous(), "cls": df.cls.contiguous()}
        tensors.update({f"layer.{b}": t.contiguous() for b, t in df.layers.items()})
        meta = {"image_size": json.dumps(df.image_size), "input_size": json.dumps(df.input_size),
                "windows": str(df.windows)}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)

    def _load(self, key: str) -> DenseFeatures | None:
        path = self._path(key)
        if path is None or not path.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has keys(), not iteration
            return DenseFeatures(
                patches=t["patches"], cls=t["cls"],
                layers={int(k.split(".", 1)[1]): v for k, v in sorted(t.items()) if k.startswith("layer.")},
                image_size=tuple(json.loads(meta["image_size"])), input_size=tuple(json.loads(meta["input_size"])),
                windows=int(meta.get("windows", 1)),
            )
        except Exception:  # a damaged cache file is a miss, never an error: recompute and overwrite it
            path.unlink(missing_ok=True)
            return None
