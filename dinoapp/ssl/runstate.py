"""A run folder that survives: atomic checkpoints, keep-last-k, resume, metrics files.

Layout of ``RUN_DIR``::

    config.yaml                  resolved config (resume and reproduce from the folder alone)
    checkpoints/step-00001000.pt model, teacher, heads, optimizer, step, RNG states, counters
    metrics.jsonl, metrics.csv   one row per logged step
    errors.jsonl                 files the dataset skipped (unreadable / no valid pixels)
    export/                      the final teacher backbone (dinoapp format + Meta flat layout)

Checkpoints are written to a temporary file in the same folder, flushed and renamed, so a crash
or ``SIGKILL`` during a write never leaves a truncated file under a checkpoint name. The data
position is the step itself (batches are a pure function of ``(seed, step)``), so resuming from a
checkpoint continues exactly where it stopped. Files load with ``weights_only=True``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointCorruptError, CheckpointError

log = logging.getLogger("dinoapp.ssl")

FORMAT = "dinoapp-ssl-run"
VERSION = 1
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the run's checkpoints, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(state: dict[str, Any], run_dir: str | os.PathLike, step: int, keep_last: int) -> Path:
    """Write ``state`` atomically as ``checkpoints/step-XXXXXXXX.pt`` and delete all but the newest
    ``keep_last`` checkpoints."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "step": step, **state}, buf)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(buf.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run checkpoint (``weights_only=True``); typed errors for foreign or damaged files."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged zip/pickle
        raise CheckpointCorruptError(f"{path}: cannot read run checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dinoapp pretraining checkpoint")
    if int(obj.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path} was written by a newer dinoapp (run format {obj.get('version')}); upgrade")
    return obj


def latest_checkpoint(run_dir: str | os.PathLike) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint of the run (a damaged newest file is reported and skipped)."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path), path
        except CheckpointError as e:
            log.warning("skipping unreadable checkpoint %s: %s", path.name, e)
    return None


# --- RNG states (stored as tensors and plain types so weights_only loading works) ------------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


# --- metrics ---------------------------------------------------------------------------------------
class MetricsWriter:
    """Per-step metrics as JSONL and CSV (and TensorBoard when asked and installed). On resume, rows
    written after the resumed checkpoint (before the interruption) are dropped first."""

    def __init__(self, run_dir: str | os.PathLike, *, start_step: int = 0, tensorboard: bool = False) -> None:
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.csv = Path(run_dir) / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if self.jsonl.exists():
            for line in self.jsonl.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if int(row.get("step", -1)) <= start_step:  # row "step" = steps completed
                    self.rows.append(row)
        self._rewrite()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                log.warning("run.tensorboard=true but tensorboard is not installed: pip install tensorboard")

    def _rewrite(self) -> None:
        with open(self.jsonl, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)
        self._write_csv()

    def _write_csv(self) -> None:
        self.cols = []
        for r in self.rows:
            self.cols += [k for k in r if k not in self.cols]
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.cols)
            w.writeheader()
            w.writerows(self.rows)

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        if any(k not in self.cols for k in row):  # a new column: rewrite with the wider header
            self._write_csv()
        else:
            with open(self.csv, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.cols).writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
