"""Processes and devices: one code path for a CPU, one GPU, and ``torchrun --nproc_per_node=N``.

Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) the process group is created with NCCL on
CUDA and gloo on CPU; a plain ``python`` run has world size 1 and no process group, and every
collective here is then a no-op. The student is wrapped with DDP (default) or FSDP2
``fully_shard`` per block (``strategy="fsdp"``, for models that do not fit one GPU in fp32).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(want: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: the process's CUDA device when CUDA is available, else the CPU."""
    from ..errors import ConfigError

    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but CUDA is not available on this machine (use cpu or auto)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_true(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on every process (one all-reduce; a no-op in one process)."""
    if not active():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def any_true(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any process."""
    return not all_true(not flag, device)


def mean_scalars(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over processes (for logging)."""
    if not active() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    """DDP over the parameters that require grad now (rebuild after freezing/unfreezing)."""
    if not info.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not any(p.requires_grad for p in module.parameters()):
        return module
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def shard_fsdp(nets: nn.Module, *, bf16: bool) -> None:
    """FSDP2 (in place): ``fully_shard`` each backbone block, the backbone (its ``forward_features``
    registered as a forward method, so calling it gathers the parameters), each head, then the
    whole module. With ``bf16`` the gathered parameters and compute are bf16 and gradient
    reductions fp32 (spec section 2: large runs)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError:  # pragma: no cover - older torch kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    for blk in nets.backbone.blocks:
        fully_shard(blk, mp_policy=mp)
    fully_shard(nets.backbone, mp_policy=mp)
    register_fsdp_forward_method(nets.backbone, "forward_features")
    fully_shard(nets.dino_head, mp_policy=mp)
    fully_shard(nets.ibot_head, mp_policy=mp)
    fully_shard(nets, mp_policy=mp)


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 unit in ``module`` (no-op when already sharded)."""
    for m in module.modules():
        if hasattr(m, "reshard") and callable(m.reshard):
            m.reshard()


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The process-local data of a (possibly FSDP2/DTensor) parameter, for in-place maths."""
    return p.to_local() if hasattr(p, "to_local") else p
