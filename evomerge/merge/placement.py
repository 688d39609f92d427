"""Placements: where a worker's input models live while it merges candidate after candidate.

``resident``
    every input tensor on the device of the parameter it feeds, read once when the worker
    starts (the fastest: a merge reads only device memory).
``pinned``
    every input tensor in page-locked host memory (one buffer per model, registered with CUDA);
    per candidate each tensor is copied to its device just before it is merged, and the copies
    of the next tensors run on a side CUDA stream (``non_blocking``, ordered by events) while
    this one is merged, so the merge is bound by PCIe bandwidth, not latency. On a CPU worker
    "pinned" degrades to plain host memory and the copy to a no-op — the same code path.
``mmap``
    nothing held: each tensor is read per candidate from its safetensors file through a memory
    map opened for that tensor alone (the process never keeps file pages mapped, so its memory
    stays flat; the OS page cache keeps hot files in RAM when it can), one step ahead of the
    merge in a background thread.

Every placement hands the merge the same bytes, so the merged weights are identical whatever
the placement (``tests/test_placement.py``). An input whose tensors are *computed* when read
rather than stored — a LoRA adapter over its base (:mod:`evomerge.merge.lora`: the base's
tensor plus the low-rank product), a vocabulary-aligned input (:mod:`evomerge.merge.vocab`), or
pickled weights — has no bytes on disk to copy: every placement reads it through the model
object (``ModelDir.get``), so ``resident`` and ``pinned`` hold the computed tensors and ``mmap``
computes each one per candidate (through the base's safetensors memory map, whose pages are the
OS page cache, reclaimable) in the same background thread, one step ahead of the merge.

Which placement a worker uses is chosen by the memory plan (:mod:`evomerge.memory`) before any
worker starts.

The merge asks for tensors in an order it announces first (:meth:`Placed.expect`: a list of
``(alias, tensor name, device)``); streamed placements stage that list ``lookahead`` entries
ahead. A request off the announced list is served synchronously (correct, just not overlapped).
"""

from __future__ import annotations

import logging
import math
import mmap
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from evomerge.errors import ConfigError, ModelError
from evomerge.merge.headers import TensorHeader
from evomerge.models import ModelDir

log = logging.getLogger(__name__)

Key = tuple[str, str, torch.device]  # (alias, tensor name in that model, device it is needed on)
DeviceOf = Callable[[str], torch.device]


# ---------------------------------------------------------------------- reading bytes
def _as_tensor(raw: torch.Tensor, h: TensorHeader) -> torch.Tensor:
    """A uint8 buffer viewed as the header's dtype and shape."""
    return raw.view(h.torch_dtype).reshape(h.shape) if h.nbytes else torch.empty(h.shape, dtype=h.torch_dtype)


def read_into(h: TensorHeader, out: torch.Tensor) -> torch.Tensor:
    """Read one tensor's bytes straight into ``out`` (a CPU uint8 tensor of ``h.nbytes``) with
    plain file reads (no memory map stays behind); returns ``out`` viewed as the tensor."""
    if h.nbytes:
        view = memoryview(out.numpy()).cast("B")
        with open(h.file, "rb", buffering=0) as f:
            f.seek(h.start)
            got = 0
            while got < h.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise ModelError(f"{h.file}: tensor {h.name} is truncated ({got} of {h.nbytes} bytes)")
                got += n
    return _as_tensor(out, h)


def read_mapped(h: TensorHeader) -> torch.Tensor:
    """One tensor through a memory map of just its byte range, copied out, map closed."""
    out = torch.empty(h.nbytes, dtype=torch.uint8)
    if h.nbytes:
        lo = h.start - h.start % mmap.ALLOCATIONGRANULARITY
        with open(h.file, "rb") as f, mmap.mmap(f.fileno(), h.end - lo, offset=lo, access=mmap.ACCESS_READ) as m:
            src = np.frombuffer(m, dtype=np.uint8, count=h.nbytes, offset=h.start - lo)
            out.numpy()[:] = src
            del src  # release the buffer export before the map closes
    return _as_tensor(out, h)


def stored_headers(d) -> dict[str, TensorHeader] | None:
    """``d``'s safetensors headers when its tensors are exactly the stored bytes, else ``None``:
    a model whose tensors are computed on read (a :class:`~evomerge.merge.lora.AdaptedModel`, an
    :class:`~evomerge.merge.vocab.AlignedModel` — wrappers, not :class:`ModelDir` subclasses) or
    pickled weights, which placements read through ``d.get``."""
    return d.headers if isinstance(d, ModelDir) and not d.pickled else None


_ALIGN = 16  # byte alignment of each tensor in a pinned buffer (any dtype can view its slice)


def _nbytes(d, name: str) -> int:
    return math.prod(d.shape(name)) * d.dtype(name).itemsize


def read_computed(d, name: str, out: torch.Tensor) -> torch.Tensor:
    """Tensor ``name`` read through the model object ``d`` and copied into ``out`` (a CPU uint8
    buffer of its size); returns ``out`` viewed as the tensor."""
    t = d.get(name)
    if t.numel() * t.element_size() != out.numel():
        raise ModelError(f"{d.path}: tensor {name} reads as {list(t.shape)} × {t.dtype}, "
                         f"its header says {list(d.shape(name))} × {d.dtype(name)}")
    view = out.view(t.dtype).view(t.shape) if out.numel() else torch.empty(t.shape, dtype=t.dtype)
    view.copy_(t)
    return view


def check_finite(t: torch.Tensor, d: ModelDir, name: str) -> torch.Tensor:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ModelError(f"{d.path}: tensor {name} contains NaN or Inf values")
    return t


# ---------------------------------------------------------------------- the interface
class Placed(ABC):
    """Input tensors by ``(alias, name)``, served on the device a merge asks for."""

    name: str = ""

    def __init__(self, dirs: dict[str, ModelDir], device_of: DeviceOf):
        self.dirs = dirs
        self.device_of = device_of
        self._unique = list({id(d): d for d in dirs.values()}.values())

    @abstractmethod
    def get(self, alias: str, name: str, device: torch.device) -> torch.Tensor:
        """The tensor on ``device`` (never to be modified: it may be the stored copy)."""

    def expect(self, keys: list[Key]) -> None:
        """The requests of the next merge, in order (streamed placements stage ahead)."""

    def close(self) -> None:
        """Release what the placement holds (idempotent)."""


class Resident(Placed):
    """Every input tensor on the device of the parameter it feeds (see module docstring)."""

    name = "resident"

    def __init__(self, dirs: dict[str, ModelDir], device_of: DeviceOf):
        super().__init__(dirs, device_of)
        self._tensors: dict[int, dict[str, torch.Tensor]] = {}
        for d in self._unique:
            heads = stored_headers(d)
            loaded = {}
            for n in d.tensor_names:
                dev = device_of(n)
                if heads is None:  # computed on read (adapter, aligned vocabulary, pickle)
                    t = d.get(n, dev)
                else:
                    t = read_into(heads[n], torch.empty(heads[n].nbytes, dtype=torch.uint8))
                    t = t.to(dev) if dev.type != "cpu" else t
                loaded[n] = check_finite(t, d, n)
            self._tensors[id(d)] = loaded

    def get(self, alias: str, name: str, device: torch.device) -> torch.Tensor:
        d = self.dirs[alias]
        t = self._tensors[id(d)].get(name)
        if t is None:
            raise ModelError(f"{d.path}: no tensor named {name}")
        return t if t.device == device else t.to(device)

    def close(self) -> None:
        self._tensors.clear()


def default_lookahead(inputs: int) -> int:
    """Requests staged ahead: the inputs of the next merged tensor (at least two)."""
    return max(2, inputs)


class Streamed(Placed):
    """Tensors staged onto their device per merge, ``lookahead`` requests ahead (base class)."""

    def __init__(self, dirs: dict[str, ModelDir], device_of: DeviceOf, lookahead: int | None = None):
        super().__init__(dirs, device_of)
        self.lookahead = lookahead if lookahead is not None else default_lookahead(len(dirs))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"evomerge-{self.name}")
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._schedule: list[Key] = []
        self._pos = 0  # next request expected
        self._next = 0  # next schedule entry to submit
        self._inflight: dict[int, Future] = {}

    @abstractmethod
    def _host(self, alias: str, name: str) -> torch.Tensor:
        """The tensor in host memory."""

    def _check(self, t: torch.Tensor, alias: str, name: str) -> torch.Tensor:
        return t

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device)
        return s

    def _stage(self, key: Key) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        alias, name, device = key
        host = self._host(alias, name)
        if device.type != "cuda":
            return host.to(device), None
        stream = self._stream(device)
        with torch.cuda.stream(stream):
            t = host.to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return t, ready

    def _fill(self) -> None:
        while self._next < len(self._schedule) and self._next - self._pos < self.lookahead:
            self._inflight[self._next] = self._pool.submit(self._stage, self._schedule[self._next])
            self._next += 1

    def _drain(self) -> None:
        for fut in self._inflight.values():
            try:
                fut.result()
            except Exception:  # a failed prefetch of an abandoned merge: nothing to report
                pass
        self._inflight.clear()

    def expect(self, keys: list[Key]) -> None:
        self._drain()
        self._schedule, self._pos, self._next = list(keys), 0, 0
        self._fill()

    def get(self, alias: str, name: str, device: torch.device) -> torch.Tensor:
        key = (alias, name, device)
        fut = None
        if self._pos < len(self._schedule) and self._schedule[self._pos] == key:
            fut = self._inflight.pop(self._pos, None)
            self._pos += 1
        t, ready = fut.result() if fut is not None else self._stage(key)
        self._fill()
        if ready is not None:  # the merge runs on the current stream: order it after the copy
            current = torch.cuda.current_stream(device)
            current.wait_event(ready)
            t.record_stream(current)
        return self._check(t, alias, name)

    def close(self) -> None:
        self._drain()
        self._pool.shutdown(wait=True)
        self._schedule = []


class Pinned(Streamed):
    """Inputs in page-locked host memory, streamed per tensor (see module docstring)."""

    name = "pinned"

    def __init__(self, dirs: dict[str, ModelDir], device_of: DeviceOf, lookahead: int | None = None):
        super().__init__(dirs, device_of, lookahead)
        self._buffers: list[torch.Tensor] = []
        self._registered: list[int] = []
        self._tensors: dict[int, dict[str, torch.Tensor]] = {}
        for d in self._unique:
            heads = stored_headers(d)
            sizes = {n: heads[n].nbytes if heads is not None else _nbytes(d, n) for n in d.tensor_names}
            offsets, total = {}, 0
            for n, nb in sizes.items():  # each tensor starts aligned, so its slice views as any dtype
                offsets[n] = total
                total += -(-nb // _ALIGN) * _ALIGN
            buf = torch.empty(total, dtype=torch.uint8)  # one buffer per model: no power-of-two rounding
            self._pin(buf)
            self._buffers.append(buf)
            views = {}
            for n, at in offsets.items():
                out = buf[at:at + sizes[n]]
                t = read_into(heads[n], out) if heads is not None else read_computed(d, n, out)
                views[n] = check_finite(t, d, n)
            self._tensors[id(d)] = views

    def _pin(self, buf: torch.Tensor) -> None:
        """Page-lock ``buf`` for CUDA (``cudaHostRegister``; torch's pinned allocator would round a
        buffer up to a power of two). Without CUDA there is nothing to pin."""
        if not torch.cuda.is_available() or buf.numel() == 0:
            return
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
        if int(err) != 0:
            log.warning("cudaHostRegister failed (%s): streaming from pageable host memory (slower)", err)
            return
        self._registered.append(buf.data_ptr())

    def _host(self, alias: str, name: str) -> torch.Tensor:
        d = self.dirs[alias]
        t = self._tensors[id(d)].get(name)
        if t is None:
            raise ModelError(f"{d.path}: no tensor named {name}")
        return t

    def close(self) -> None:
        super().close()
        self._tensors.clear()
        if self._registered:
            torch.cuda.synchronize()
            for ptr in self._registered:
                torch.cuda.cudart().cudaHostUnregister(ptr)
        self._registered.clear()
        self._buffers.clear()


class Mapped(Streamed):
    """Inputs read per candidate from their files (see module docstring)."""

    name = "mmap"

    def _host(self, alias: str, name: str) -> torch.Tensor:
        d = self.dirs[alias]
        if name not in d:
            raise ModelError(f"{d.path}: no tensor named {name}")
        heads = stored_headers(d)  # stored bytes through a map of their range; else computed on read
        return read_mapped(heads[name]) if heads is not None else d.get(name)

    def _check(self, t: torch.Tensor, alias: str, name: str) -> torch.Tensor:
        return check_finite(t, self.dirs[alias], name)


PLACEMENTS: dict[str, type[Placed]] = {c.name: c for c in (Resident, Pinned, Mapped)}


def place(kind: str, dirs: dict[str, ModelDir], device_of: DeviceOf) -> Placed:
    """The placement named ``kind`` over ``dirs``."""
    cls = PLACEMENTS.get(kind)
    if cls is None:
        raise ConfigError(f"unknown placement {kind!r}; choose one of {', '.join(PLACEMENTS)}")
    return cls(dirs, device_of)

