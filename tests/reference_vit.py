"""An independent DINOv3 ViT written from the spec (section 1), for tests only.

Plain torch on a Meta-layout state dict: no timm, explicit softmax attention, RoPE built by the
formula (periods from the file when it has them), the qkv bias multiplied by ``bias_mask``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class ReferenceViT:
    def __init__(self, sd: dict[str, torch.Tensor], num_heads: int, eps: float = 1e-5, rope_base: float = 100.0):
        self.sd = {k: v.float() for k, v in sd.items()}
        self.h = num_heads
        self.eps = eps
        self.D = self.sd["cls_token"].shape[-1]
        self.hd = self.D // num_heads
        self.R = self.sd["storage_tokens"].shape[1] if "storage_tokens" in self.sd else 0
        self.p = self.sd["patch_embed.proj.weight"].shape[-1]
        self.depth = 1 + max(int(k.split(".")[1]) for k in self.sd if k.startswith("blocks."))
        if "rope_embed.periods" in self.sd:
            self.periods = self.sd["rope_embed.periods"]
        else:
            self.periods = torch.tensor([rope_base ** (4 * j / self.hd) for j in range(self.hd // 4)])

    def ln(self, x, name):
        return F.layer_norm(x, (self.D,), self.sd[name + ".weight"], self.sd[name + ".bias"], self.eps)

    def rope_cos_sin(self, gh: int, gw: int, coord_scale: float = 1.0):
        rows = []
        for r in range(gh):
            for c in range(gw):
                y = (2 * (r + 0.5) / gh - 1) * coord_scale
                x = (2 * (c + 0.5) / gw - 1) * coord_scale
                ang = [2 * math.pi * y / float(p) for p in self.periods]  # y frequencies first
                ang += [2 * math.pi * x / float(p) for p in self.periods]  # then x
                rows.append(ang + ang)  # tiled twice to head_dim
        a = torch.tensor(rows, dtype=torch.float64)  # [N, head_dim]
        return a.cos().float(), a.sin().float()

    @staticmethod
    def rotate_half(t):
        a, b = t.chunk(2, dim=-1)
        return torch.cat([-b, a], dim=-1)

    def attention(self, x, i, cos, sin):
        pre = f"blocks.{i}.attn."
        B, N, D = x.shape
        bias = self.sd.get(pre + "qkv.bias")
        if bias is not None and pre + "qkv.bias_mask" in self.sd:
            bias = bias * self.sd[pre + "qkv.bias_mask"]
        qkv = x @ self.sd[pre + "qkv.weight"].T
        if bias is not None:
            qkv = qkv + bias
        q, k, v = qkv.split(D, dim=-1)  # rows are [q | k | v]
        q, k, v = (t.reshape(B, N, self.h, self.hd).transpose(1, 2) for t in (q, k, v))  # [B, h, N, hd]
        n0 = 1 + self.R  # CLS and registers are not rotated
        qp, kp = q[:, :, n0:], k[:, :, n0:]
        q = torch.cat([q[:, :, :n0], qp * cos + self.rotate_half(qp) * sin], dim=2)
        k = torch.cat([k[:, :, :n0], kp * cos + self.rotate_half(kp) * sin], dim=2)
        att = (q @ k.transpose(-1, -2)) * self.hd**-0.5
        out = att.softmax(dim=-1) @ v  # [B, h, N, hd]
        out = out.transpose(1, 2).reshape(B, N, D)
        return out @ self.sd[pre + "proj.weight"].T + self.sd[pre + "proj.bias"]

    def mlp(self, x, i):
        pre = f"blocks.{i}.mlp."
        if pre + "w1.weight" in self.sd:
            lin = lambda n, t: t @ self.sd[pre + n + ".weight"].T + self.sd[pre + n + ".bias"]  # noqa: E731
            return lin("w3", F.silu(lin("w1", x)) * lin("w2", x))
        h = F.gelu(x @ self.sd[pre + "fc1.weight"].T + self.sd[pre + "fc1.bias"])
        return h @ self.sd[pre + "fc2.weight"].T + self.sd[pre + "fc2.bias"]

    def tokens(self, img, masks=None):
        w = self.sd["patch_embed.proj.weight"]
        x = F.conv2d(img, w, self.sd["patch_embed.proj.bias"], stride=self.p)  # [B, D, gh, gw]
        B, _, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        if masks is not None:
            x = torch.where(masks.reshape(B, -1, 1), self.sd["mask_token"].reshape(1, 1, -1), x)
        parts = [self.sd["cls_token"].expand(B, 1, -1)]
        if self.R:
            parts.append(self.sd["storage_tokens"].expand(B, -1, -1))
        return torch.cat(parts + [x], dim=1), gh, gw

    def blocks_out(self, img, masks=None, coord_scale: float = 1.0):
        x, gh, gw = self.tokens(img, masks)
        cos, sin = self.rope_cos_sin(gh, gw, coord_scale)
        outs = []
        for i in range(self.depth):
            x = x + self.sd[f"blocks.{i}.ls1.gamma"] * self.attention(self.ln(x, f"blocks.{i}.norm1"), i, cos, sin)
            x = x + self.sd[f"blocks.{i}.ls2.gamma"] * self.mlp(self.ln(x, f"blocks.{i}.norm2"), i)
            outs.append(x)
        return outs, gh, gw

    def forward_features(self, img, masks=None, coord_scale: float = 1.0):
        outs, _, _ = self.blocks_out(img, masks, coord_scale)
        x = outs[-1]
        xn = self.ln(x, "norm")
        return {
            "x_norm_clstoken": xn[:, 0],
            "x_storage_tokens": xn[:, 1 : 1 + self.R],
            "x_norm_patchtokens": xn[:, 1 + self.R :],
            "x_prenorm": x,
        }

    def get_intermediate_layers(self, img, n=1, reshape=False, return_class_token=False,
                                return_extra_tokens=False, norm=True):  # fmt: skip
        outs, gh, gw = self.blocks_out(img)
        idx = list(range(self.depth - n, self.depth)) if isinstance(n, int) else list(n)
        res = []
        for i in idx:
            o = self.ln(outs[i], "norm") if norm else outs[i]
            patches = o[:, 1 + self.R :]
            if reshape:
                patches = patches.reshape(o.shape[0], gh, gw, -1).permute(0, 3, 1, 2)
            item = [patches]
            if return_class_token:
                item.append(o[:, 0])
            if return_extra_tokens:
                item.append(o[:, 1 : 1 + self.R])
            res.append(tuple(item) if len(item) > 1 else patches)
        return tuple(res)
