"""E5's losses: InfoNCE over in-batch + hard negatives, and KL distillation from a teacher.

Embeddings arrive L2-normalised. ``passages`` holds each example's candidates contiguously:
``[pos_0, neg_0_1..neg_0_n, pos_1, neg_1_1, ...]``, so example ``i``'s positive is row
``i * (1 + n)``. Every query is scored against every passage of the (optionally all-gathered)
batch: the other examples' positives and hard negatives are its in-batch negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import DEFAULT_ALPHA, DEFAULT_TEMPERATURE



class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over processes and returns this
    process's slice, so each rank's embeddings get the gradient of *every* rank's loss terms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(all processes' rows concatenated, this process's row offset); identity with one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


@dataclass
class LossOutput:
    loss: torch.Tensor
    infonce: torch.Tensor
    kl: torch.Tensor | None = None
    accuracy: float = 0.0  # share of queries whose positive scores highest


def contrastive_loss(
    queries: torch.Tensor,
    passages: torch.Tensor,
    group_size: int,
    temperature: float = DEFAULT_TEMPERATURE,
    teacher_scores: torch.Tensor | None = None,
    alpha: float = DEFAULT_ALPHA,
    teacher_temperature: float = 1.0,
    gather_across_processes: bool = True,
) -> LossOutput:
    """E5's training loss for this process's share of a batch.

    queries: (B, d); passages: (B * group_size, d), group_size = 1 + hard negatives per query.
    Without teacher scores: InfoNCE (cross-entropy of ``q . p / temperature`` against the
    positive). With teacher_scores (B, group_size): ``KL(p_teacher || p_student) + alpha * InfoNCE``,
    where both distributions are over the query's own candidates (its positive and hard
    negatives) and ``p_teacher = softmax(teacher_scores / teacher_temperature)``.
    The mean is over this process's queries; averaging gradients over processes gives the
    mean over the global batch.
    """
    B = queries.shape[0]
    if passages.shape[0] != B * group_size:
        raise ValueError(f"expected {B * group_size} passages for {B} queries x group {group_size}, got {passages.shape[0]}")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if gather_across_processes:
        passages, offset = gather(passages)
    else:
        offset = 0
    dt = torch.promote_types(queries.dtype, torch.float32)  # fp32 under autocast; fp64 stays fp64
    scores = queries.to(dt) @ passages.to(dt).T / temperature  # (B, all passages)
    labels = offset + torch.arange(B, device=scores.device) * group_size
    infonce = F.cross_entropy(scores, labels)
    accuracy = (scores.argmax(-1) == labels).float().mean().item()
    if teacher_scores is None:
        return LossOutput(infonce, infonce.detach(), None, accuracy)
    own = scores.gather(1, labels[:, None] + torch.arange(group_size, device=scores.device))  # (B, group)
    p_teacher = F.softmax(teacher_scores.to(scores.device, scores.dtype) / teacher_temperature, dim=-1)
    kl = F.kl_div(F.log_softmax(own, dim=-1), p_teacher, reduction="batchmean")
    return LossOutput(kl + alpha * infonce, infonce.detach(), kl.detach(), accuracy)


__all__ = ["DEFAULT_TEMPERATURE", "DEFAULT_ALPHA", "LossOutput", "contrastive_loss", "gather"]
