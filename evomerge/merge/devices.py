"""The resident merged model: built once per worker, on one device or split over several.

The architecture is instantiated from ``config.json`` with empty (uninitialised) parameters on
the device each one will live on — no weights are read, because the first candidate's merge
overwrites every parameter anyway (:func:`build_model` checks that the reference's checkpoint
feeds every parameter — by ``transformers``' own loading rules,
:class:`~evomerge.architecture.ParameterMap`: renamed tensors and per-expert tensors fused into
one parameter count — so none can stay uninitialised). Buffers computed at construction (rotary frequencies) are real. A merge that
re-indexes the vocabulary (``tokenizer_source``) gets embeddings with the output vocabulary's rows.

A worker that owns several GPUs (``executor.num_gpus: k``) holds the model split across them
with an accelerate device map (blocks never split, tied weights kept together, memory balanced);
each tensor is then merged on the device of its parameter (:mod:`evomerge.merge.materialize`
asks the placement for inputs on that device; :func:`tensor_devices` says which device each
checkpoint tensor feeds). A map over one device takes the same path.
"""

from __future__ import annotations

import torch

from evomerge.errors import ModelError
from evomerge.models import ModelDir


def resolve_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    """``auto`` → bfloat16 on CUDA, float32 elsewhere; else the named dtype."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    dt = getattr(torch, str(dtype), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ModelError(f"evaluation.dtype: {dtype!r} is not a floating dtype (auto, float32, bfloat16, float16)")
    return dt


def _key(device: str) -> int | str:
    d = torch.device(device)
    return d.index if d.type == "cuda" and d.index is not None else str(d)


def device_map(model: torch.nn.Module, devices: list[str], dtype: torch.dtype) -> dict[str, int | str]:
    """Module name → device: everything on ``devices[0]`` for one device, else a balanced
    accelerate map over ``devices`` (modules of ``_no_split_modules`` stay whole)."""
    if len(devices) == 1:
        return {"": _key(devices[0])}
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    keys = [_key(d) for d in devices]
    total = {k: (torch.cuda.get_device_properties(k).total_memory if isinstance(k, int) else 2 ** 50) for k in keys}
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    balanced = get_balanced_memory(model, max_memory=total, no_split_module_classes=no_split, dtype=dtype)
    dmap = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)
    off = sorted({str(v) for v in dmap.values() if v not in keys})
    if off:
        raise ModelError(f"the model does not fit on {', '.join(devices)}: the device map puts part of it on "
                         f"{off[0]}; give the worker more GPUs (executor.num_gpus)")
    return dmap


def _device_for(name: str, dmap: dict[str, int | str]) -> torch.device:
    """The device of the longest module prefix of ``name`` in ``dmap``."""
    best, where = -1, None
    for prefix, dev in dmap.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if len(prefix) > best:
                best, where = len(prefix), dev
    if where is None:
        raise ModelError(f"the device map places no module holding {name}")
    return torch.device(f"cuda:{where}" if isinstance(where, int) else where)


def _known(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter (tied aliases too) and buffer names → tensors: what a checkpoint tensor can feed."""
    return {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}


def build_model(ref: ModelDir, devices: list[str], dtype: torch.dtype, trust_remote_code: bool = False,
                split: bool = False, vocab_size: int | None = None) -> torch.nn.Module:
    """The reference's architecture with empty parameters on ``devices`` (see module docstring).

    ``split`` routes even a single device through the device-map path (tests exercise it on CPU);
    ``vocab_size`` resizes the token embeddings (a merge that re-indexes the vocabulary).
    """
    from accelerate import dispatch_model, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ref.path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        model.tie_weights()
    dmap = device_map(model, devices, dtype)
    for module_name, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is not None and p.device.type == "meta":
                full = f"{module_name}.{pname}" if module_name else pname
                dev = _device_for(full, dmap)
                module._parameters[pname] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device=dev), requires_grad=False)
        for bname, b in list(module._buffers.items()):
            if b is not None:
                full = f"{module_name}.{bname}" if module_name else bname
                module._buffers[bname] = b.to(_device_for(full, dmap))
    if tied:
        model.tie_weights()
    if vocab_size is not None:  # new rows are overwritten by the merge like every other
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    _check_checkpoint(ref, model)
    if split or len(devices) > 1:
        model = dispatch_model(model, device_map=dmap)
    model.requires_grad_(False)
    return model.eval()


def _check_checkpoint(ref: ModelDir, model: torch.nn.Module) -> None:
    """The checkpoint feeds every parameter, only parameters, at their shapes (as
    ``from_pretrained``'s loading info would say): evomerge fills every parameter from the merge
    and cannot leave one uninitialised. One line otherwise (:func:`evomerge.safety.check_loading_info`)."""
    from evomerge.architecture import ParameterMap
    from evomerge.safety import check_loading_info

    known = _known(model)
    pmap = ParameterMap.for_model(model)
    targets = {n: pmap.target(n, known) for n in ref.tensor_names}
    fed = {p for p, _ in targets.values()}
    check_loading_info(ref.path, {
        "missing_keys": [n for n, _ in model.named_parameters() if n not in fed],
        "unexpected_keys": [n for n, (p, _) in targets.items() if p not in known],
        "mismatched_keys": [n for n, (p, pattern) in targets.items()
                            if pattern is None and p in known and tuple(known[p].shape) != tuple(ref.shape(n))],
    })


def tensor_devices(model: torch.nn.Module, names: list[str]) -> dict[str, torch.device]:
    """Checkpoint tensor name → the device of the parameter or buffer it feeds (renamed and
    fused tensors too, by :class:`~evomerge.architecture.ParameterMap`); names that feed nothing
    in ``model`` are left out."""
    from evomerge.architecture import ParameterMap

    known = _known(model)
    pmap = ParameterMap.for_model(model)
    targets = {n: pmap.target(n, known)[0] for n in names}
    return {n: known[p].device for n, p in targets.items() if p in known}
