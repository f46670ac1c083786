"""A feature cache so the app, the notebooks and the CLI never compute the same features twice.

Keys are built from the backbone's identity (:func:`dinoapp.identity.backbone_fingerprint`), the
preprocessing options and the input (the bytes of an array, or a file's path, size and
modification time), so a different model, resolution or image can never hit a stale entry.
Entries live in memory (LRU, bounded by ``max_bytes``) and optionally on disk (``disk_dir``, one
safetensors file per entry, written atomically), so a restarted app or notebook finds them again.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import json
import os
import threading
import uuid
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dense import DenseFeatures, dense_features
from .errors import ConfigError
from .identity import backbone_fingerprint

# dense_features' options and their defaults: a key is the same whether an option is given or left at its default
_DEFAULTS = {n: p.default for n, p in list(inspect.signature(dense_features).parameters.items())[2:]}
_NOT_IN_KEY = ("progress", "batch_size")  # change how the features are computed, not what they are


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
    elif isinstance(image, torch.Tensor) and image.dtype in (torch.bfloat16, torch.float16):
        t = image.detach().cpu().contiguous()  # numpy has no bfloat16: hash the raw 16-bit words
        h.update(f"tensor:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    else:
        arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        h.update(f"array:{arr.shape}:{arr.dtype.str}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _plain(v: Any) -> Any:
    """An option value as plain JSON-able Python (tuples -> lists, numpy scalars -> numbers, dtypes -> str)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    return v


def _state(backbone) -> tuple:
    """What must not change for a memoised fingerprint to stay valid: every parameter's and buffer's storage,
    dtype, device and version counter (bumped by in-place updates such as optimiser steps or load_state_dict),
    and the input normalisation. Costs microseconds, unlike hashing the weights."""
    tensors = itertools.chain(backbone.parameters(), backbone.buffers())
    return (
        tuple((t.data_ptr(), t.dtype, t.device, t._version) for t in tensors),
        tuple(map(float, getattr(backbone, "mean", ()))),
        tuple(map(float, getattr(backbone, "std", ()))),
    )


def make_key(fingerprint: str, options: dict[str, Any], digest: str) -> str:
    """The cache key of (backbone, preprocessing/extraction options, input)."""
    blob = json.dumps({"bb": fingerprint, "opts": options, "in": digest}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _nbytes(df: DenseFeatures) -> int:
    return sum(t.numel() * t.element_size() for t in [df.patches, df.cls, *df.layers.values()])


class FeatureCache:
    """LRU cache of :class:`~dinoapp.dense.DenseFeatures` in memory (``max_bytes``) and on disk (``disk_dir``).

    ``cache.features(backbone, image, **dense_options)`` returns cached features or computes them
    with :func:`dinoapp.dense.dense_features`. Thread-safe (the app serves several sessions): concurrent
    requests for the same features compute them once, the others wait and get that result.
    ``hits``/``misses`` count lookups. A ``disk_dir`` that cannot be written is reported once (a
    ``RuntimeWarning``) and the cache goes on in memory. Entries are shared, not copied: don't modify
    the returned tensors in place.
    """

    def __init__(self, max_bytes: int = 2 * 2**30, disk_dir: str | os.PathLike | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self.disk_dir = Path(disk_dir).expanduser() if disk_dir is not None else None
        self._mem: OrderedDict[str, DenseFeatures] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self._fp: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # backbone -> (state, fingerprint)
        self._pending: dict[str, list] = {}  # key -> [lock, number of threads using it]
        self._disk_warned = False
        self.hits = 0
        self.misses = 0

    def fingerprint(self, backbone) -> str:
        """The backbone's fingerprint, memoised per object while its weights, dtype, device and mean/std
        don't change (see :func:`_state`; in-place writes through ``param.data`` bypass torch's version
        counter: call :meth:`clear` after such surgery)."""
        state = _state(backbone)
        with self._lock:
            got = self._fp.get(backbone)
        if got is None or got[0] != state:
            got = (state, backbone_fingerprint(backbone))
            with self._lock, contextlib.suppress(TypeError):  # an object without weak references: not memoised
                self._fp[backbone] = got
        return got[1]

    def key(self, backbone, image: Any, **options: Any) -> str:
        """The key of ``dense_features(backbone, image, **options)``: options at their defaults count as not
        given, and ``layers`` as the set of blocks they name (``-1`` = the last block)."""
        unknown = sorted(set(options) - set(_DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown dense_features option(s) {unknown}; known: {sorted(_DEFAULTS)}")
        opts = {k: _plain(v) for k, v in {**_DEFAULTS, **options}.items() if k not in _NOT_IN_KEY}
        n = int(backbone.n_blocks)
        layers = opts.get("layers") or []
        if all(isinstance(i, int) and -n <= i < n for i in layers):  # else dense_features raises; key as given
            opts["layers"] = sorted({i % n for i in layers})
        return make_key(self.fingerprint(backbone), opts, input_digest(image))

    def features(self, backbone, image: Any, *, loader: Callable[[Any], Any] | None = None, **options: Any):
        """Cached :func:`dense_features` of ``image`` (a path is read with ``loader``, e.g. ``domains.load``,
        and keyed by the file's identity, so the file is not even read on a hit)."""
        k = self.key(backbone, image, **options)
        with self._key_lock(k):  # one computation per key; other threads asking for it wait for the result
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

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        with self._lock:
            entry = self._pending.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    self._pending.pop(key, None)

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

        tensors = {"patches": df.patches.contiguous(), "cls": df.cls.contiguous()}
        tensors.update({f"layer.{b}": t.contiguous() for b, t in df.layers.items()})
        meta = {"image_size": json.dumps(df.image_size), "input_size": json.dumps(df.input_size),
                "windows": str(df.windows)}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")  # unique per writer (threads)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
        except Exception as e:  # noqa: BLE001 - a cache that cannot write must not fail the computation
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if not self._disk_warned:
                self._disk_warned = True
                warnings.warn(f"feature cache: cannot write to {self.disk_dir} ({type(e).__name__}: {e}); "
                              "keeping features in memory only", RuntimeWarning, stacklevel=4)  # fmt: skip

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
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return None
