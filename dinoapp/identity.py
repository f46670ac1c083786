"""A backbone's identity: a short fingerprint of what it computes, for caches and trained heads.

Two backbones have the same fingerprint when they have the same architecture, the same input
normalisation and the same weights. The weights enter through a strided sample of every tensor
(at most 4096 values each, plus its shape and dtype), so the fingerprint of a ViT-L costs
milliseconds, and any training step, which moves every weight, changes it. Heads trained on frozen
features record the fingerprint and refuse to run on another backbone; feature caches use it as
part of their key.
"""

from __future__ import annotations

import hashlib
import json

import torch

_SAMPLE = 4096


def backbone_fingerprint(backbone) -> str:
    """16 hex digits identifying ``backbone``'s architecture, normalisation and weights."""
    h = hashlib.sha256()
    h.update(json.dumps(backbone.arch.to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps([list(map(float, backbone.mean)), list(map(float, backbone.std))]).encode())
    with torch.no_grad():
        for name, t in sorted(backbone.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            if flat.numel() == 0:
                continue
            step = max(1, flat.numel() // _SAMPLE)
            sample = flat[::step][:_SAMPLE].to(device="cpu", dtype=torch.float32).contiguous()
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def backbone_identity(backbone) -> dict:
    """What a head or a cache records about the backbone it was made with (JSON-serialisable)."""
    return {
        "fingerprint": backbone_fingerprint(backbone),
        "arch": backbone.arch.to_dict(),
        "source": backbone.provenance.get("source"),
        "sha256": backbone.provenance.get("sha256"),
        "mean": list(map(float, backbone.mean)),
        "std": list(map(float, backbone.std)),
    }
