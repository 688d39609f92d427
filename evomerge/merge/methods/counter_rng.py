"""Counter-based uniforms for the random sparsifiers (DARE, DELLA): u = H(key, flat index).

A random mask is a pure function of the expert's key and each entry's position, so it does not
depend on how a tensor is chunked, on the device, or on whether the fused kernel runs compiled,
and costs a few integer ops per entry inside the pass that uses it (a seeded ``torch.Generator``
costs ~3 ns per entry and must be drawn in index order).

* **Keys.** One 31-bit key per expert is drawn from the operator's seeded ``torch.Generator``
  (:func:`draw_keys`), in models order. The engine seeds that generator from what identifies the
  *mask family* — the recipe's ``seed``, the tensor name, the sparsification and the models'
  aliases in order — never from weights or densities (common random numbers, see
  docs/operators.md, *Randomness*).
* **Hash.** ``x = i ^ key`` (i = position within its block of 2³¹ entries), then the 32-bit
  mixer ``[16 21f0aaad 15 735a2d97 15]`` from Chris Wellons' hash prospector (xor-shift /
  multiply rounds; a bijection of 32-bit words; both multipliers < 2³¹). Computed in int32
  torch ops: shifts are arithmetic there, so each right shift is masked to make it logical, and
  the multiplications wrap modulo 2³² (two's complement, as torch's CPU and CUDA kernels do;
  :func:`hash32_reference` is the plain-integer definition a test holds the tensor version to).
* **Uniform.** The top 24 bits, ``(x >>> 8) · 2⁻²⁴``: exactly representable floats in [0, 1),
  the resolution of ``torch.rand`` for float32.
* **Keep probabilities on a grid.** DARE keeps an entry iff u < p̂, p̂ = :func:`keep_probability`
  (density) = round(density · 2¹²) / 2¹² (resolution 2.4e-4). Then u < p̂ ⇔ the hash's top 12
  bits (its bucket, :func:`bucket_reference`) < p̂·2¹² exactly, so Σ|τ̂| of an expert at *any*
  density is a prefix sum of a 4096-bin histogram of |τ| over buckets, built once per resident
  expert and key (``sparsify.with_l1_factors``): the ``l1`` rescale then needs no pass of its own.
* **Huge tensors.** Positions are taken modulo 2³¹ (int32 arithmetic); block j ≥ 1 of 2³¹
  entries uses the key :func:`block_key` ``(key, j)`` — callers split passes at block boundaries.
"""

from __future__ import annotations

import math

import torch

BLOCK = 1 << 31  # positions per key block (int32 index arithmetic)
_M32 = 0xFFFFFFFF
_C1, _C2 = 0x21F0AAAD, 0x735A2D97
_SCALE = 2.0 ** -24
KEEP_BITS = 12  # keep probabilities are multiples of 2^-KEEP_BITS
KEEP_STEPS = 1 << KEEP_BITS


def hash32_reference(x: int) -> int:
    """The mixer on one non-negative integer < 2³², with Python integers (the definition)."""
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    return x ^ (x >> 15)


def uniform_reference(key: int, i: int) -> float:
    """u for flat position ``i`` (< 2³¹) under ``key``, with Python integers."""
    return (hash32_reference(i ^ key) >> 8) * _SCALE


def keep_probability(density: float) -> float:
    """DARE's keep probability p̂ for ``density``: the nearest multiple of 2⁻¹² (halves round up),
    clamped to [0, 1]. Every path (eager, compiled, ``sparsify_``) keeps u < p̂, so they agree."""
    return min(max(math.floor(density * KEEP_STEPS + 0.5), 0), KEEP_STEPS) / KEEP_STEPS


def bucket_reference(key: int, i: int) -> int:
    """The top 12 bits of the hash of position ``i``: u < m·2⁻¹² ⇔ bucket < m (the definition)."""
    return hash32_reference(i ^ key) >> (32 - KEEP_BITS)


def uniforms(idx: torch.Tensor, key: torch.Tensor | int) -> torch.Tensor:
    """float32 uniforms for int32 positions ``idx`` (each < 2³¹) under ``key`` (int or int32
    0-d tensor); functional, so that the fused kernel can be compiled around it."""
    x = idx ^ key
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x21F0AAAD  # _C1, _C2 as literals (module constants would become kernel inputs)
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * 0x735A2D97
    x = x ^ ((x >> 15) & 0x1FFFF)
    return ((x >> 8) & 0xFFFFFF).to(torch.float32) * (2.0 ** -24)  # a literal: compiles to a constant


def uniforms_into(out: torch.Tensor, start: int, key: int, work: torch.Tensor) -> torch.Tensor:
    """:func:`uniforms` of positions ``start … start + len(out)`` (within one block) into the
    float32 ``out``, computed in place on the int32 buffer ``work`` (same length; ``out``'s
    memory serves as the second buffer): the eager twin, with no allocation."""
    x = hash_into(work, start, key, out.view(torch.int32))
    x.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF)
    return out.copy_(x).mul_(_SCALE)


def hash_into(x: torch.Tensor, start: int, key: int, y: torch.Tensor) -> torch.Tensor:
    """The 32-bit hashes (as int32) of positions ``start … start + len(x)`` (within one block)
    under ``key``, into ``x``; ``y`` (int32, same length) is scratch."""
    torch.arange(start, start + x.numel(), dtype=torch.int32, device=x.device, out=x)
    x.bitwise_xor_(key)
    for shift, mask, mul in ((16, 0xFFFF, _C1), (15, 0x1FFFF, _C2), (15, 0x1FFFF, None)):
        x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=y).bitwise_and_(mask))
        if mul is not None:
            x.mul_(mul)
    return x


def buckets_into(x: torch.Tensor, start: int, key: int, y: torch.Tensor) -> torch.Tensor:
    """:func:`bucket_reference` of positions ``start …`` into the int32 ``x`` (``y``: scratch)."""
    shift = 32 - KEEP_BITS
    return hash_into(x, start, key, y).bitwise_right_shift_(shift).bitwise_and_((1 << KEEP_BITS) - 1)


def draw_keys(generator: torch.Generator, count: int) -> list[int]:
    """``count`` 31-bit keys from ``generator`` (one draw of ``count`` integers)."""
    if count == 0:
        return []
    return torch.randint(0, BLOCK, (count,), generator=generator, device=generator.device).tolist()


def block_key(key: int, block: int) -> int:
    """The key of block ``block`` (positions ``block·2³¹ …``): ``key`` itself for block 0."""
    if block == 0:
        return key
    return hash32_reference((key ^ hash32_reference(block & _M32)) & _M32) >> 1
