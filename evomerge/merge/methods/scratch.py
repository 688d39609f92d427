"""Per-thread scratch buffers reused across calls, and the ``out=`` convention of operators."""

from __future__ import annotations

import threading

import torch


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.bufs: dict[tuple, torch.Tensor] = {}


_SCRATCH = _Scratch()


def scratch(slot: int | str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A reusable uninitialised buffer shaped like ``like`` (slot ``slot`` of this thread), on
    ``like``'s device, of ``like``'s dtype unless ``dtype`` is given.

    Operators number their per-model slots 0, 1, …; helpers use named slots.

    Fresh multi-MB allocations cost page faults on CPU (a 64 MB ``torch.sub`` is ~6x slower
    than the same op into an existing buffer), so operators keep their temporaries here.
    """
    dtype = dtype or like.dtype
    key = (slot, dtype, like.device)
    buf = _SCRATCH.bufs.get(key)
    n = like.numel()
    if buf is None or buf.numel() < n:
        buf = torch.empty(max(n, 1), dtype=dtype, device=like.device)
        _SCRATCH.bufs[key] = buf
    return buf[:n].view(like.shape)


def release_scratch() -> None:
    """Free this thread's scratch buffers (they are re-created on demand)."""
    _SCRATCH.bufs.clear()


def result(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(like, dtype=torch.float32)
    if out.shape != like.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(like.shape)}")
    return out
