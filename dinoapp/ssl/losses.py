"""DINO, iBOT and KoLeo losses and Sinkhorn-Knopp teacher targets (DINOv3 spec, section 2).

All functions compute in float32 whatever the input dtype (bf16 logits are upcast before any
exp / log-softmax) and return float32 scalars. Collectives run only when ``torch.distributed``
is available and initialised with more than one process; then :func:`sinkhorn_knopp` gives the
same targets as one process holding every rank's rows, and :func:`koleo_loss` (``gather=True``)
searches neighbours over every rank's rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import ConfigError, InputError


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iters: int = 3) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp centering: logits [N, K] -> probabilities [N, K].

    Spec, section 2: Q = exp(T / temp); Q /= sum(Q); ``n_iters`` times: every prototype's mass
    (column of [N, K]) is set to 1/K, then every sample's (row) to 1/N; finally rows are scaled
    to sum to 1. With several processes the per-prototype maxima and sums and N are all-reduced,
    so each rank gets its rows of the single-process result over all ranks' rows;
    ranks may hold different N, also 0 (every rank must call this function).

    Stability: computed in the log domain (log-sum-exp for both normalisations), which is the same
    algorithm in exact arithmetic; the initial division by the total is omitted because the first
    prototype normalisation cancels it. No exp of a raw logit can overflow, and no sample's row can
    underflow to all zeros however far its logits lie below every prototype's best sample.
    """
    if teacher_logits.ndim != 2:
        raise InputError(f"sinkhorn_knopp expects teacher logits [N, K], got shape {tuple(teacher_logits.shape)}")
    if not temp > 0:
        raise ConfigError(f"teacher temperature must be > 0, got {temp}")
    logq = teacher_logits.float() / temp  # [N, K], log Q up to a constant
    n, k = logq.shape
    distributed = _world_size() > 1
    n_rows = logq.new_tensor([float(n)])  # [1]
    if distributed:
        dist.all_reduce(n_rows)
    log_n, log_k = torch.log(n_rows), float(torch.log(torch.tensor(float(k))))
    for _ in range(n_iters):
        # every prototype (column): total mass 1/K over the samples of all processes
        peak = logq.amax(dim=0, keepdim=True) if n > 0 else logq.new_full((1, k), float("-inf"))  # [1, K]
        if distributed:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        mass = (logq - peak).exp().sum(dim=0, keepdim=True)  # [1, K]
        if distributed:
            dist.all_reduce(mass)
        logq = logq - (peak + mass.log()) - log_k
        # every sample (row): mass 1/N
        logq = logq - logq.logsumexp(dim=1, keepdim=True) - log_n
    return (logq + log_n).exp()  # [N, K], rows sum to 1


def dino_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    student_temp: float = 0.1,
    *,
    ignore_diagonal: bool = False,
) -> torch.Tensor:
    """DINO cross-entropy between crops: student logits [S, B, K], teacher probabilities [T, B, K].

    Mean over (student crop s, teacher crop t) pairs and the B samples of
    -sum_k P_t[k] log softmax(S_s / student_temp)[k] (spec, section 2). ``ignore_diagonal``
    (student and teacher see the same S == T global crops) leaves out the s == t pairs.

    Summed over all pairs the cross-entropy factorises, -sum_{b,k} (sum_t P_t)(sum_s log p_s), so
    the cost is (S + T) * B * K; the s == t terms are subtracted when ignored.
    """
    if student_logits.ndim != 3 or teacher_probs.ndim != 3 or student_logits.shape[1:] != teacher_probs.shape[1:]:
        raise InputError(
            f"dino_loss expects student logits [S, B, K] and teacher probabilities [T, B, K] with the same B and K, "
            f"got {tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
        )
    S, B, _ = student_logits.shape
    T = teacher_probs.shape[0]
    if ignore_diagonal and S != T:
        raise InputError(f"ignore_diagonal needs as many student as teacher crops (the same crops), got {S} and {T}")
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)  # [S, B, K]
    p_t = teacher_probs.float()  # [T, B, K]
    total = -(p_t.sum(dim=0) * log_p.sum(dim=0)).sum()  # sum of the CE over all S*T pairs and B samples
    n_pairs = S * T
    if ignore_diagonal:
        total = total + (p_t * log_p).sum()  # minus the CE of the s == t pairs
        n_pairs -= S
    if n_pairs == 0 or B == 0:
        return log_p.sum() * 0.0  # no pairs: zero, still connected to the student
    return total / (n_pairs * B)


def dino_term_weights(n_global: int, n_local: int) -> tuple[float, float]:
    """(local_weight, global_weight) of the DINO loss: each term's share of all crop pairs.

    Local pairs: n_local student crops x n_global teacher crops; global pairs: n_global x
    (n_global - 1) (same crop excluded). Spec defaults 2 global / 8 local give (16/18, 2/18).
    """
    if n_global < 1 or n_local < 0:
        raise ConfigError(f"need at least 1 global crop and >= 0 local crops, got {n_global} and {n_local}")
    local_pairs = n_local * n_global
    global_pairs = n_global * (n_global - 1)
    if local_pairs + global_pairs == 0:
        raise ConfigError("the DINO loss needs 2 global crops or at least 1 local crop (1 global, 0 local given)")
    total = local_pairs + global_pairs
    return local_pairs / total, global_pairs / total


def ibot_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """iBOT masked-patch cross-entropy (spec, section 2).

    ``student_logits`` / ``teacher_probs`` [M, K] hold the masked patches in ``masks.nonzero()``
    order (row-major over ``masks`` bool [B, N]). Loss = (1/B) sum_b (1/m_b) sum over b's masked
    patches of -sum_k P[k] log softmax(S / student_temp)[k]; images without masked patches count 0
    but stay in B. M = 0 gives a zero connected to ``student_logits``.
    """
    if student_logits.ndim != 2 or student_logits.shape != teacher_probs.shape:
        raise InputError(
            f"ibot_loss expects student logits and teacher probabilities of the same shape [M, K], "
            f"got {tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
        )
    if masks.ndim != 2 or masks.shape[0] == 0:
        raise InputError(f"ibot_loss expects masks [B, N] with B >= 1, got shape {tuple(masks.shape)}")
    masks = masks.bool()
    M = student_logits.shape[0]
    per_image = masks.sum(dim=1)  # [B], m_b
    if not masks.is_cuda and int(per_image.sum()) != M:  # (skipped on GPU: it would synchronise)
        raise InputError(f"masks select {int(per_image.sum())} patches but {M} logit rows were given")
    weight = 1.0 / per_image.clamp_min(1).float()  # [B]
    row_weight = torch.repeat_interleave(weight.to(student_logits.device), per_image.to(student_logits.device),
                                         output_size=M)  # [M], 1/m_b of each row's image  # fmt: skip
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)  # [M, K]
    ce = -(teacher_probs.float() * log_p).sum(dim=-1)  # [M]
    return (ce * row_weight).sum() / masks.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8, *, gather: bool = False) -> torch.Tensor:
    """KoLeo entropy regulariser on features x [B, D] (spec, section 2).

    z = normalize(x); each row's nearest neighbour is the other row with the largest dot
    product; L = -mean_i log(||z_i - z_nn(i)|| + eps). With ``gather=True`` and several
    processes, neighbours are searched over every rank's rows (all ranks must pass the same B;
    the gather backpropagates to the owning rank) and the mean is over the local rows: with DDP's
    gradient averaging this is the single-process loss over the concatenated batch. A single row
    with nobody to compare to gives a zero connected to ``x``.
    """
    if x.ndim != 2:
        raise InputError(f"koleo_loss expects features [B, D], got shape {tuple(x.shape)}")
    z = F.normalize(x.float(), dim=-1, p=2, eps=eps)  # [B, D]
    B = z.shape[0]
    offset = 0
    if gather and _world_size() > 1:
        pool = _GatherRows.apply(z)  # [W*B, D], gradients flow back to each row's owner
        offset = dist.get_rank() * B
    else:
        pool = z
    if B == 0 or pool.shape[0] < 2:
        return z.sum() * 0.0
    with torch.no_grad():
        sim = z @ pool.T  # [B, W*B]
        sim.diagonal(offset=offset).fill_(float("-inf"))  # never one's own row
        nn_idx = sim.argmax(dim=1)  # [B]
    dist_nn = torch.linalg.vector_norm(z - pool[nn_idx], dim=-1)  # [B]
    return -torch.log(dist_nn + eps).mean()


class _GatherRows(torch.autograd.Function):
    """All ranks' rows [W*B, D] (equal B on every rank) with a backward that returns to each rank the
    summed gradient of its own rows (what torch.distributed.nn.functional.all_gather does; that
    function is deprecated in recent torch and warns on every call)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        ctx.rows = z.shape[0]
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts, dim=0)  # [W*B, D]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # [W*B, D]
        dist.all_reduce(grad)  # every rank's loss may use every row
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]  # [B, D]
