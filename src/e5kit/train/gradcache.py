"""Gradient caching (Gao et al., 2021): contrastive batches far larger than fit in memory.

1. Encode every chunk without an autograd graph (recording the RNG state before each chunk).
2. Compute the loss on all embeddings at once and back-propagate to the embeddings only.
3. Re-encode chunk by chunk with the graph, replaying the recorded RNG state so dropout draws
   the same masks, and back-propagate the cached embedding gradients into the weights.

The weight gradient equals the one of a single full-batch backward; memory is one chunk's
activations plus the (batch, dim) embeddings.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence, TypeVar

import torch

from .losses import LossOutput

Chunk = TypeVar("Chunk")


class RandState:
    """The CPU (and, for a CUDA device, that device's) RNG state at construction, replayable later."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda_device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.cuda_device is not None else None

    @contextlib.contextmanager
    def replay(self):
        devices = [self.cuda_device] if self.cuda_device is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda_device is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


def _backward(loss: torch.Tensor, scaler) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def full_batch_step(
    encode: Callable[[Chunk], torch.Tensor],
    chunks: Sequence[Chunk],
    loss_fn: Callable[[torch.Tensor], LossOutput],
    scaler=None,
) -> LossOutput:
    """Plain step: encode everything with the graph kept, then one backward."""
    out = loss_fn(torch.cat([encode(c) for c in chunks]))
    _backward(out.loss, scaler)
    return out


def grad_cache_step(
    encode: Callable[[Chunk], torch.Tensor],
    chunks: Sequence[Chunk],
    loss_fn: Callable[[torch.Tensor], LossOutput],
    device: torch.device | str = "cpu",
    scaler=None,
) -> LossOutput:
    """Same gradients as :func:`full_batch_step`, holding one chunk's graph at a time.

    ``encode`` maps a chunk to its (n, d) embeddings (under whatever autocast the caller wants);
    ``loss_fn`` maps the concatenated embeddings of all chunks to the loss.
    """
    device = torch.device(device)
    states, embs = [], []
    with torch.no_grad():
        for c in chunks:
            states.append(RandState(device))
            embs.append(encode(c))
    sizes = [e.shape[0] for e in embs]
    cached = torch.cat(embs).detach().requires_grad_(True)
    out = loss_fn(cached)
    _backward(out.loss, scaler)
    grads = cached.grad.split(sizes)
    for c, g, st in zip(chunks, grads, states):
        with st.replay():
            e = encode(c)
        # d(sum(e * g))/dθ = J_e^T g: the chunk's share of the full-batch gradient.
        torch.dot(e.flatten(), g.flatten().to(e.dtype)).backward()
    return out


__all__ = ["RandState", "full_batch_step", "grad_cache_step"]
