"""Merge methods: one small function per method, registered by name, one module per family
(as in mergekit's ``merge_methods``).

Contract (every operator):

    fn(base, tensors, params, options, generator, *, out=None) -> Tensor

* ``base``: the base model's tensor (float32) or ``None`` for operators that need none;
* ``tensors``: the input models' tensors (float32, same shape and device as ``base``), in the
  recipe's ``models`` order; never modified in place;
* ``params``: one dict per input model with the operator's per-model parameters resolved for
  this tensor (e.g. ``{"weight": 0.5, "density": 0.7}``), defaults filled in;
* ``options``: the operator's global parameters resolved for this tensor (e.g. ``normalize``);
* ``generator``: a seeded ``torch.Generator`` on the tensors' device for random operators
  (DARE, DELLA), seeded from the recipe's mask family (``seed``, tensor name, sparsification,
  models — not its coefficients: ``Recipe.mask_key``) so that one recipe always yields the same
  weights and recipes that differ in coefficients share their masks. Random operators draw from
  it and from nothing else, in ``models`` order (DARE and DELLA draw one key per model, whatever
  its density, and hash positions with it, :mod:`.counter_rng`);
* ``out`` (optional): a float32 tensor of the same shape that receives the result (e.g. the
  resident model's parameter), so that a search worker allocates nothing per candidate. It
  must not alias any input.

The result is a float32 tensor of the same shape (``out`` when given, else a new tensor).
Semantics follow docs/ALGORITHMS.md §1 and mergekit 0.1.5's implementation where mergekit has the
method (same parameter names and defaults); where the papers and mergekit differ the choice is
an option (``rescale_mode``, ``sign_method``, ``normalize``) whose default is mergekit's.
``docs/operators.md`` has the formulas and the equivalence record.

Performance: searches merge thousands of times, so operators avoid full sorts (see
:func:`~evomerge.merge.methods.sparsify.kth_largest`), fuse what they can into a few passes, and
keep their temporaries in per-thread scratch buffers reused across calls
(:mod:`~evomerge.merge.methods.scratch`; ``release_scratch`` frees them).

Families: :mod:`.linear` (``linear``), :mod:`.generalized_task_arithmetic` (``task_arithmetic``,
``ties``, ``dare_*``, ``breadcrumbs*``, ``della*``; their trimming and masks live in
:mod:`.sparsify` and :mod:`.counter_rng`, their per-entry pass in :mod:`.fused`, compiled with
``torch.compile`` where :mod:`.compiled` allows), :mod:`.slerp`, :mod:`.spherical` (``nuslerp``, ``multislerp``, ``karcher``),
:mod:`.model_stock`, :mod:`.passthrough`, :mod:`.sce`, :mod:`.selection` (``nearswap``,
``arcee_fusion``), and from the papers :mod:`.lines` (LiNeS), :mod:`.pcb`, :mod:`.widen`,
:mod:`.consensus` (TALL masks / consensus merging) and :mod:`.weighted_average` (``fisher``,
``metric_weighted``). Importing this package
registers them all; :mod:`.registry` holds :class:`Operator`, ``OPERATORS``, :func:`get_operator`
and :func:`register`.
"""

from evomerge.merge.methods import (consensus, generalized_task_arithmetic, lines,  # noqa: F401
                                    linear, model_stock, passthrough, pcb, sce, selection, slerp,
                                    spherical, weighted_average, widen)
from evomerge.merge.methods.registry import OPERATORS, Operator, OperatorFn, get_operator, register

__all__ = ["OPERATORS", "Operator", "OperatorFn", "get_operator", "register"]
