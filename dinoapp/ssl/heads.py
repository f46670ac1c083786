"""The DINO / iBOT projection head (DINOv3 spec, section 2, "Heads").

One class serves both heads (two instances): an MLP D -> 2048 -> 2048 -> 256 with GELUs,
L2 normalisation, then a bias-free linear layer onto K prototypes (65536 by default). DINOv3
dropped DINOv2's weight norm on that last layer. Parameter names follow Meta's training dumps
(``mlp.0``, ``mlp.2``, ``mlp.4``, ``last_layer``), so a head stored in a Meta checkpoint
(``DinoBackbone.pretrained_heads``) loads with ``load_state_dict``. Released checkpoints carry
no heads: continued pretraining starts with fresh ones.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError


class DINOHead(nn.Module):
    """MLP + L2 normalisation + prototypes. ``forward(x [..., D]) -> logits [..., K]``.

    Attributes: ``in_dim`` (D), ``n_prototypes`` (K), ``mlp`` (the ``nn.Sequential``),
    ``last_layer`` (``nn.Linear(bottleneck_dim, K, bias=False)``; frozen during the first epoch by
    the training loop).
    """

    def __init__(
        self,
        in_dim: int,
        n_prototypes: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("n_prototypes", n_prototypes), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim), ("n_layers", n_layers)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"DINOHead {name} must be a positive integer, got {value!r}")
        self.in_dim = in_dim
        self.n_prototypes = n_prototypes
        if n_layers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(n_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, n_prototypes, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated normal (std 0.02) weights, zero biases, as DINO/DINOv2/DINOv3."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # [..., bottleneck]
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)  # [..., bottleneck], unit norm
        return self.last_layer(x)  # [..., K]

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, n_prototypes={self.n_prototypes}"
