"""``torch.compile`` for fused merge kernels, with the eager path as the fallback.

Policy (decided once per process, logged once at debug level):

* **Where.** CPU only: inductor's C++ code is built with ``-ffp-contract=off`` and IEEE division,
  so a kernel written as plain float32 ops (no ``alpha=``, no ``addcmul``) gives the same bits as
  the same ops run eagerly one by one — the tests hold both paths to ``torch.equal``. On CUDA,
  triton contracts multiply-adds into FMAs and divides approximately by default, so CUDA keeps the
  eager path (large chunks, few launches) until that is verified on a GPU.
* **Off switch.** ``EVOMERGE_COMPILE=0``, Windows, a torch without inductor, or the first compile
  failing (no C++ compiler, …) turn it off for the process; callers then run eagerly.
* **Once per shape class.** Each kernel variant (static configuration) is compiled once with
  ``dynamic=True``: tensor sizes and storage offsets are symbolic, scalars are 0-d/1-d tensor
  inputs, so new tensors, weights and densities reuse the compiled code (~3–20 s per variant on
  first use; inductor's on-disk cache shortens later processes).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from typing import Any, Callable

import torch

_log = logging.getLogger(__name__)
_DEVICES = ("cpu",)
_RECOMPILE_LIMIT = 64  # variants share one code object; dynamo's default of 8 would fall back silently


class _Policy:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.enabled: bool | None = None  # None: not decided yet
        self.kernels: dict[tuple, Callable] = {}

    def decide(self) -> bool:
        if self.enabled is None:
            reason = None
            if os.environ.get("EVOMERGE_COMPILE", "1").strip().lower() in ("0", "false", "no", "off"):
                reason = "EVOMERGE_COMPILE=0"
            elif sys.platform.startswith("win"):
                reason = "Windows"
            elif not hasattr(torch, "compile"):
                reason = "this torch has no torch.compile"
            self.enabled = reason is None
            if reason:
                _log.debug("fused merge kernels run eagerly: %s", reason)
            else:
                from torch import _dynamo

                cfg = _dynamo.config
                cfg.recompile_limit = max(cfg.recompile_limit, _RECOMPILE_LIMIT)
                _log.debug("fused merge kernels are compiled with torch.compile (inductor) on %s", _DEVICES)
        return self.enabled

    def disable(self, err: BaseException) -> None:
        with self.lock:
            if self.enabled:
                _log.debug("fused merge kernels run eagerly from now on: compiling failed (%s: %s)",
                           type(err).__name__, err)
            self.enabled = False


_POLICY = _Policy()


def available(device: torch.device) -> bool:
    """Whether compiled kernels may run on ``device`` in this process."""
    return device.type in _DEVICES and _POLICY.decide()


def run(fn: Callable, static: dict[str, Any], *args) -> tuple[bool, Any]:
    """Run the compiled ``fn(*args, **static)``: (True, its result), or (False, None) — and
    compiling off for good — when it cannot be compiled, so that the caller runs its eager twin."""
    if not _POLICY.decide():
        return False, None
    key = (fn, tuple(sorted(static.items())))
    kernel = _POLICY.kernels.get(key)
    if kernel is None:
        kernel = torch.compile(functools.partial(fn, **static), dynamic=True, fullgraph=True)
        _POLICY.kernels[key] = kernel
    try:
        value = kernel(*args)
    except Exception as err:  # noqa: BLE001 - any failure to build means: run eagerly
        _POLICY.disable(err)
        return False, None
    return True, value


def reset(enabled: bool | None = None, forget_kernels: bool = False) -> None:
    """Forget the decision (tests; ``enabled`` forces one) and, with ``forget_kernels``, the
    compiled kernels."""
    with _POLICY.lock:
        _POLICY.enabled = enabled
        if forget_kernels:
            _POLICY.kernels.clear()
