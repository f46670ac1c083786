"""The library's exceptions.

Every error dinoapp raises on purpose is a :class:`DinoappError` and also subclasses the built-in
exception a Python user would expect (``ValueError``, ``FileNotFoundError``, ...), so both
``except dinoapp.CheckpointError`` and ``except ValueError`` work. Messages say what is wrong
and what to do about it.
"""

from __future__ import annotations


class DinoappError(Exception):
    """Base class of every error raised on purpose by dinoapp."""


class SourceNotFoundError(DinoappError, FileNotFoundError):
    """A path or name given as a model source does not exist."""


class UnknownSourceError(DinoappError, ValueError):
    """A string is neither a file, a folder, a known architecture nor a timm DINOv3 name."""


class HubUnavailableError(DinoappError, ConnectionError):
    """Pretrained weights are not in the local cache and the model hub cannot be reached."""


class CheckpointError(DinoappError, ValueError):
    """A checkpoint file cannot be turned into a DINOv3 backbone."""


class CheckpointCorruptError(CheckpointError):
    """The file is truncated or is not a checkpoint at all."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled objects other than tensors and plain containers (possible code)."""


class UnsupportedFormatError(CheckpointError):
    """The file is a readable state dict but not in any layout dinoapp knows."""


class CheckpointMismatchError(CheckpointError):
    """Keys are missing, unexpected or of the wrong shape for the detected architecture."""

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.mismatched = list(mismatched or [])


class HeadBackboneMismatchError(CheckpointMismatchError):
    """A head is used (loaded, saved or run) with a backbone other than the one it was trained on.

    ``expected`` and ``got`` are the two backbones' identity dicts (``got`` may be partial).
    """

    def __init__(self, message: str, *, expected: dict | None = None, got: dict | None = None) -> None:
        super().__init__(message)
        self.expected = dict(expected or {})
        self.got = dict(got or {})


class InputError(DinoappError, ValueError):
    """An image or tensor handed to dinoapp has a shape, type or size it cannot use."""


class ConfigError(DinoappError, ValueError):
    """An option has an unknown name, a wrong type or an out-of-range value."""
