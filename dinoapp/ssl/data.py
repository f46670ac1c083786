"""The pretraining data stream: which images each step sees, how they are read and cropped, how they are batched.

The order is an infinite stream of per-epoch permutations, addressed by the step (:func:`batch_plan`),
so resuming needs only the step number and every rank reads its own contiguous slice of the global
batch (:class:`StepBatchSampler`). Each item is keyed by ``(epoch, index)`` and its crops are a
pure function of ``(seed, epoch, index)`` (:class:`SSLDataset`), so results do not depend on the
number of DataLoader workers or processes. Files come from a ``domains.FolderDataset``, which skips
unreadable files (it returns the next readable one), so one corrupt file never stops a run.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, InputError
from .augment import MultiCrop


def derive_seed(*keys: int) -> int:
    """A 64-bit seed mixed from integer keys (e.g. ``(seed, epoch, index)``) by numpy's SeedSequence."""
    state = np.random.SeedSequence([int(k) % 2**64 for k in keys]).generate_state(2, np.uint32)
    return int(state[0]) | (int(state[1]) << 32)


@functools.lru_cache(maxsize=2)  # a global batch spans at most 2 epochs (when global_batch <= n_items)
def _epoch_perm(n_items: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n_items, generator=torch.Generator().manual_seed(derive_seed(seed, epoch)))  # [n_items]


def batch_plan(step: int, global_batch: int, n_items: int, seed: int) -> list[tuple[int, int]]:
    """The ``(epoch, index)`` keys of the global batch at ``step``.

    Positions ``p = step * global_batch + j`` run through an infinite stream of epochs, each a
    random permutation of the ``n_items`` items seeded from ``(seed, epoch)``: ``epoch = p // n_items``,
    ``index = perm_epoch[p % n_items]``. Every item is seen once per epoch.
    """
    if n_items < 1 or global_batch < 1 or step < 0:
        raise ConfigError(
            f"batch_plan needs n_items >= 1, global_batch >= 1, step >= 0; got {n_items}, {global_batch}, {step}"
        )
    start = step * global_batch
    out: list[tuple[int, int]] = []
    for epoch in range(start // n_items, (start + global_batch - 1) // n_items + 1):
        lo = max(start, epoch * n_items) - epoch * n_items
        hi = min(start + global_batch, (epoch + 1) * n_items) - epoch * n_items
        out.extend((epoch, i) for i in _epoch_perm(n_items, seed, epoch)[lo:hi].tolist())
    return out


class StepBatchSampler:
    """Yields, for steps ``start_step .. total_steps - 1``, this rank's contiguous slice of :func:`batch_plan`.

    Use as a DataLoader ``batch_sampler``; each rank gets ``global_batch // world_size`` keys per step.
    """

    def __init__(
        self,
        n_items: int,
        global_batch: int,
        seed: int,
        *,
        start_step: int = 0,
        total_steps: int,
        rank: int = 0,
        world_size: int = 1,
        n_variants: int = 1,
    ) -> None:
        if n_items < 1:
            raise ConfigError("the dataset is empty: no images to pretrain on")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in 0 .. world_size - 1 = {world_size - 1}")
        if global_batch < 1 or global_batch % world_size:
            raise ConfigError(
                f"the global batch ({global_batch}) must be a positive multiple of the number of processes "
                f"({world_size}); change the batch size or the number of GPUs"
            )
        if not 0 <= start_step <= total_steps:
            raise ConfigError(f"start_step={start_step} must be in [0, total_steps={total_steps}]")
        self.n_items, self.global_batch, self.seed = n_items, global_batch, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size = rank, world_size
        self.local_batch = global_batch // world_size
        self.n_variants = int(n_variants)

    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        lo = self.rank * self.local_batch
        for step in range(self.start_step, self.total_steps):
            keys = batch_plan(step, self.global_batch, self.n_items, self.seed)[lo : lo + self.local_batch]
            if self.n_variants > 1:  # e.g. mixed global crop sizes: one per step, the same on every rank
                v = step_variant(self.seed, step, self.n_variants)
                keys = [(e, i, v) for e, i in keys]
            yield keys


def step_variant(seed: int, step: int, n_variants: int) -> int:
    """Which of ``n_variants`` crop settings (e.g. global crop sizes 512 / 768) step ``step`` uses."""
    return derive_seed(seed, step, 0x5EED) % n_variants


class SSLDataset(Dataset):
    """Multi-crop views of a folder's images, keyed by ``(epoch, index)``.

    ``source``: a ``domains.FolderDataset`` (or anything with ``__len__`` and ``__getitem__(i) -> (array
    [C, H, W], meta)`` with ``meta["value_range"]``, and optionally an ``epoch`` attribute for its
    random windows). Values are scaled from ``meta["value_range"]`` to [0, 1] and clipped; one-channel
    images are repeated to ``in_chans``. Nodata pixels (``meta["valid"]``) stay in the crops as the
    reader's fill value: use FolderDataset's ``window`` + ``min_valid`` for scenes with large nodata areas.
    """

    def __init__(self, source: Any, multicrop: MultiCrop | Sequence[MultiCrop], *, in_chans: int, seed: int) -> None:
        self.source, self.in_chans, self.seed = source, int(in_chans), int(seed)
        # several MultiCrops = variants chosen per step by the sampler (keys (epoch, index, variant))
        self.multicrops = list(multicrop) if isinstance(multicrop, (list, tuple)) else [multicrop]
        self.multicrop = self.multicrops[0]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, ...]) -> dict[str, Any]:
        epoch, index = key[0], key[1]
        multicrop = self.multicrops[key[2] if len(key) > 2 else 0]
        if hasattr(self.source, "epoch"):
            self.source.epoch = epoch
        n = len(self.source)
        for k in range(n):  # a file the model cannot take (bands, no display range) is skipped like a corrupt one
            arr, meta = self.source[(index + k) % n]
            try:
                image = to_unit(arr, meta, self.in_chans)  # [C, H, W] in [0, 1]
                break
            except InputError as err:
                record = getattr(self.source, "_record", None)
                if record is None or "index" not in meta or getattr(self.source, "on_error", "skip") == "raise":
                    raise
                record(int(meta["index"]), err)
                last = err
        else:
            raise InputError(f"none of the {n} files can be used for training (see the errors log); last: {last}")
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, index))
        crops = multicrop(image, generator)
        item = {"global": crops["global"], "local": crops["local"], "index": int(index)}
        if "gram" in crops:  # MultiCrop(gram_size=...): the high-resolution Gram teacher's crops
            item["gram"] = crops["gram"]  # [2, C, G, G]
        return item


def to_unit(arr: np.ndarray, meta: dict[str, Any], in_chans: int) -> torch.Tensor:
    """A reader's array [C, H, W] (or [H, W]) -> float32 [in_chans, H, W] in [0, 1]: scaled from
    ``meta["value_range"]`` and clipped (NaN -> 0), one band repeated to ``in_chans``; an
    :class:`InputError` naming the file and the option to change otherwise."""
    name = meta.get("path", "this file")
    vr = meta.get("value_range")
    if vr is None:
        raise InputError(
            f"{name}: values are physical (HU, float reflectance, ...) with no display range, so they cannot be "
            "scaled to [0, 1]; read DICOMs with a window (data.dicom_window=lung, or dicom={'window': 'lung'} "
            "in Python) and GeoTIFFs with band statistics (data.stats=band_stats.json / geotiff={'stats': ...})"
        )
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))  # [C, H, W]
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise InputError(f"{name}: shape {tuple(x.shape)} is not [channels, height, width]")
    lo, hi = float(vr[0]), float(vr[1])
    if (lo, hi) != (0.0, 1.0):
        x = (x - lo) / (hi - lo)
    x = x.nan_to_num(0.0).clamp(0.0, 1.0)
    c = x.shape[0]
    if c == in_chans:
        return x
    if c == 1:
        return x.expand(in_chans, -1, -1)
    raise InputError(
        f"{name} has {c} channels ({', '.join(map(str, meta.get('channels') or [])) or 'unnamed'}) but the "
        f"model takes in_chans={in_chans}: select bands (data.bands=[4,3,2] or data.bands=rgb; "
        f"geotiff={{'bands': [...]}} in Python) or pretrain with model.in_chans={c}"
    )


def collate_crops(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack items crop-major: ``global_crops [2, B, C, g, g]``, ``local_crops [n_local, B, C, l, l]``,
    ``index [B]`` (the requested item indexes), and ``gram_crops [2, B, C, G, G]`` when the items have
    Gram crops (``MultiCrop(gram_size=...)``, spec section 3)."""
    batch = {
        "global_crops": torch.stack([it["global"] for it in items], dim=1),  # [2, B, C, g, g]
        "local_crops": torch.stack([it["local"] for it in items], dim=1),  # [n_local, B, C, l, l]
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),  # [B]
    }
    n_gram = sum("gram" in it for it in items)
    if n_gram:
        if n_gram != len(items):
            raise InputError(f"collate_crops: {n_gram} of {len(items)} items have Gram crops; give all or none")
        batch["gram_crops"] = torch.stack([it["gram"] for it in items], dim=1)  # [2, B, C, G, G]
    return batch


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # one process per core: intra-op threads would oversubscribe


def make_loader(
    dataset: Dataset, sampler: StepBatchSampler, *, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader over ``sampler``'s steps with :func:`collate_crops` (persistent workers, 1 thread each)."""
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_crops,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=workers,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=2 if workers else None,
    )
