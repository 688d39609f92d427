"""The memory plan of a search worker, computed before any worker starts.

From the models' safetensors headers (dtypes and shapes; no tensor is read), their
``config.json`` and the executor's resources, the plan says, per worker:

* what each part needs — the inputs (base + experts at their stored dtype), the merged model
  (at ``evaluation.dtype``), the merge's float32 scratch for the largest tensor, the staging
  buffers of streamed placements, the order cache the space's operator keeps between
  candidates (TIES, breadcrumbs, DELLA; bounded by ``EVOMERGE_ORDER_CACHE_MB``), the evaluation
  batch (KV cache, activations, logits);
* what each placement (:mod:`evomerge.merge.placement`) would need on the device and in host
  memory, whether it fits the budget (less the headroom), and what a merge costs in bytes moved
  over the slowest link (HBM, PCIe or disk, at the assumed bandwidths of :data:`BANDWIDTH`);
* the placement the workers will use: the first that fits of resident, pinned, mmap (or the
  one ``memory.placement`` forces).

``evomerge plan CONFIG`` prints it; ``evomerge search`` refuses a plan that cannot fit with one
line that says what to change. The formula is documented in docs/scale.md; every term is a
field of :class:`MemoryPlan`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.recipe import reference_alias

GB = 1e9
# Bytes per second of the link a placement's merge is bound by (assumptions; docs/scale.md).
BANDWIDTH = {
    "hbm": 3.0e12,  # H100/H200 HBM3, ~3 TB/s
    "pcie": 25e9,  # PCIe 4/5 x16 host→device from pinned memory, ~25 GB/s sustained
    "nvme": 5e9,  # one NVMe SSD, 3–7 GB/s; cold page cache
    "dram": 10e9,  # one CPU worker thread streaming float32 merges from host memory
}
CUDA_CONTEXT = 0.6 * GB  # per device: CUDA context + cuBLAS workspaces, never available to tensors
PLACEMENT_ORDER = ("resident", "pinned", "mmap")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_bytes(value: Any) -> int | None:
    """``80GB`` (10^9), ``80GiB`` (2^30), ``512MB``, or a number of bytes."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"a memory size must be positive, got {value!r}")
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a memory size; write e.g. 80GB, 24GiB or 512MB")
    unit = (m.group(2) or "b").lower()
    power = "bkmgt".index(unit[0])
    n = float(m.group(1)) * ((1024 if "i" in unit else 1000) ** power)
    if n <= 0:
        raise ValueError(f"a memory size must be positive, got {value!r}")
    return int(n)


def _cfg(config: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return default


# ---------------------------------------------------------------------- what the models hold
@dataclass
class ModelFacts:
    """One input model, from its headers."""

    path: str
    aliases: list[str]
    bytes: int
    dtypes: dict[str, int]  # safetensors dtype -> bytes
    largest_bytes: int  # the largest tensor at its stored dtype


@dataclass
class EvalShape:
    """The architecture numbers that size the evaluation batch (from config.json)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int

    @classmethod
    def from_config(cls, c: dict) -> "EvalShape":
        text = c.get("text_config") if isinstance(c.get("text_config"), dict) else c
        hidden = int(_cfg(text, "hidden_size", "n_embd", "d_model"))
        heads = int(_cfg(text, "num_attention_heads", "n_head"))
        return cls(
            layers=int(_cfg(text, "num_hidden_layers", "n_layer", "num_layers")),
            hidden=hidden,
            intermediate=int(_cfg(text, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
            heads=heads,
            kv_heads=int(_cfg(text, "num_key_value_heads", "n_head_kv", default=heads)),
            head_dim=int(_cfg(text, "head_dim", default=hidden // heads)),
            vocab=int(_cfg(text, "vocab_size")),
            max_positions=int(_cfg(text, "max_position_embeddings", "n_positions", "max_seq_len", "n_ctx",
                                   default=2048)),
        )


def eval_bytes(shape: EvalShape, batch: int, length: int, itemsize: int, cuda: bool) -> dict[str, int]:
    """The evaluation batch: KV cache for ``batch × length`` tokens, the widest transient of a
    block (q/k/v/o + MLP; the attention score matrix too off CUDA, where SDPA materialises it),
    and the logits with their log-softmax (loglikelihood requests score every position)."""
    tokens = batch * length
    kv = 2 * shape.layers * tokens * shape.kv_heads * shape.head_dim * itemsize
    block = tokens * (4 * shape.hidden + 3 * shape.intermediate) * itemsize
    if not cuda:
        block += 2 * batch * shape.heads * length * length * itemsize
    logits = 2 * tokens * shape.vocab * itemsize
    return {"kv_cache": kv, "activations": block, "logits": logits}


# ---------------------------------------------------------------------- the plan
@dataclass
class PlacementNeed:
    placement: str
    device_bytes: int  # per device of the worker (the busiest one when split)
    host_bytes: int  # per worker
    fits: bool | None  # None: the budget is unknown
    why: str  # what does not fit ("" when it fits)
    merge_link: str  # the link a merge is bound by
    merge_s: float  # estimated seconds per candidate merge at BANDWIDTH[merge_link]


@dataclass
class MemoryPlan:
    device: str  # cuda | cpu
    devices_per_worker: int  # GPUs a worker owns (split model when > 1)
    workers: int
    workers_per_node: int
    gpu_share: float  # fraction of one GPU a worker gets (< 1: several workers share a GPU)
    dtype: str  # the merged model's
    inputs: list[ModelFacts]
    input_bytes: int
    model_params: int
    model_bytes: int
    largest_numel: int
    merge_inputs: int  # tensors read per merged tensor (base + experts)
    scratch_bytes: int
    staging_device_bytes: int
    staging_host_bytes: int
    order_cache_bytes: int  # on the merge's device, kept between candidates (resident inputs)
    order_cache_from: str
    batch_size: int
    max_length: int
    max_length_from: str
    eval: dict[str, int]
    device_budget: int | None  # per device
    device_budget_from: str
    host_budget: int  # per worker
    host_budget_from: str
    headroom: float
    reserved_bytes: int  # per device: CUDA context
    needs: dict[str, PlacementNeed] = field(default_factory=dict)
    requested: str = "auto"
    placement: str | None = None  # chosen; None when nothing fits
    split_devices: list[str] | None = None

    # ------------------------------------------------------------------ derived
    @property
    def eval_bytes(self) -> int:
        return sum(self.eval.values())

    @property
    def usable_device(self) -> int | None:
        if self.device_budget is None:
            return None
        return int(self.device_budget * (1 - self.headroom)) - self.reserved_bytes

    @property
    def usable_host(self) -> int:
        return int(self.host_budget * (1 - self.headroom))

    @property
    def fits(self) -> bool | None:
        if self.placement is not None:
            return self.needs[self.placement].fits
        return False

    def predicted_peak(self, placement: str | None = None) -> int:
        """Bytes a worker holds at its peak (device + host; on a CPU worker they are one memory)."""
        need = self.needs[placement or self.placement or PLACEMENT_ORDER[-1]]
        return need.device_bytes * self.devices_per_worker + need.host_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fits"] = self.fits
        d["eval_bytes"] = self.eval_bytes
        d["usable_device"] = self.usable_device
        d["usable_host"] = self.usable_host
        d["candidates_per_hour_merge_bound"] = {p: (3600 / n.merge_s if n.merge_s > 0 else None)
                                                for p, n in self.needs.items()}
        return d

    # ------------------------------------------------------------------ refusal
    def advice(self) -> str:
        """What to change, most effective first (for the one-line refusal)."""
        tips: list[str] = []
        best = min(self.needs.values(), key=lambda n: n.device_bytes)
        usable = self.usable_device or 0
        if self.gpu_share < 1:
            tips.append("fewer workers per GPU (executor.num_gpus: 1)")
        if self.device == "cuda" and self.dtype == "float32":
            tips.append("evaluation.dtype: bfloat16 (or auto)")
        if self.requested != "auto":
            other = [p for p in PLACEMENT_ORDER if p != self.requested and self.needs[p].fits]
            if other:
                where = {"resident": "keep the inputs on the device", "pinned": "offload to host memory",
                         "mmap": "offload to disk"}[other[0]]
                tips.append(f"{where} (memory.placement: {other[0]} or auto)")
        if self.device == "cuda" and usable > 0 and best.device_bytes > usable and self.gpu_share >= 1:
            per_gpu_total = self.devices_per_worker * best.device_bytes
            k = max(self.devices_per_worker + 1, math.ceil(per_gpu_total / usable))
            tips.append(f"split the model over more GPUs (executor.num_gpus: {k})")
        if self.eval_bytes > 0.25 * max(usable, 1):
            tips.append("a smaller evaluation.batch_size or memory.max_length")
        return " or ".join(tips[:3]) or "a machine with more memory"

    def refusal(self) -> str | None:
        """One line when no placement fits, else None."""
        if self.placement is not None:
            return None
        shown = self.needs[self.requested] if self.requested != "auto" else min(
            self.needs.values(), key=lambda n: n.device_bytes)
        return (f"memory plan: a worker does not fit ({shown.placement}: {shown.why}); "
                f"change {self.advice()} — see `evomerge plan`")

    def require_fit(self) -> None:
        msg = self.refusal()
        if msg:
            raise ConfigError(msg)


def _budgets(device: str, memory, workers_per_node: int) -> tuple[int | None, str, int, str]:
    import psutil

    host = parse_bytes(memory.host_memory)
    host_from = "memory.host_memory"
    if host is None:
        host, host_from = psutil.virtual_memory().total, "this machine"
    host_per_worker = host // max(1, workers_per_node)
    dev = parse_bytes(memory.device_memory)
    dev_from = "memory.device_memory"
    if dev is None:
        if device == "cpu":
            dev, dev_from = host_per_worker, f"{host_from}, shared by {workers_per_node} worker(s)"
        else:
            import torch

            if torch.cuda.is_available():
                dev, dev_from = torch.cuda.get_device_properties(0).total_memory, "GPU 0 of this machine"
            else:
                dev_from = "unknown: no GPU here; set memory.device_memory"
    return dev, dev_from, host_per_worker, f"{host_from}, shared by {workers_per_node} worker(s)"


def _longest_request(cfg, models: dict[str, str], objectives=None) -> int | None:
    """Tokens of the longest request of the search and validation objectives (their lm-eval tasks
    tokenized with the worker's tokenizer), or None when unknown or for a custom worker.
    ``objectives``: the config's :class:`~evomerge.evaluation.check.CheckedObjectives` (the search
    preflight's, tasks already built); built here when not given."""
    from transformers import AutoTokenizer

    if cfg.executor.worker is not None:
        return None
    tok_dir = str(models[reference_alias(models)]).split("+", 1)[0]
    if not (Path(tok_dir) / "tokenizer_config.json").is_file() and not (Path(tok_dir) / "tokenizer.json").is_file():
        return None
    if objectives is None:
        from evomerge.evaluation.check import check_search_objectives

        objectives = check_search_objectives(cfg)
    return objectives.longest_request(AutoTokenizer.from_pretrained(tok_dir))


def plan_worker(cfg, models: dict[str, str], objectives=None) -> MemoryPlan:
    """The plan for one worker of ``cfg`` (a SearchConfig) merging ``models`` (alias → model
    reference: a directory, a LoRA adapter or ``base+adapter``, sized as the adapted model — the
    base's tensors at their stored dtypes). ``objectives``: ``cfg``'s objectives as the search
    preflight checked them (:func:`evomerge.evaluation.check.check_search_objectives`), so their
    tasks are not built twice; checked here when the plan needs them and none are given."""
    from evomerge.merge.devices import resolve_dtype
    from evomerge.merge.lora import open_model
    from evomerge.merge.placement import default_lookahead

    ex, mem, ev = cfg.executor, cfg.memory, cfg.evaluation
    if ex.device != "auto":
        device = "cuda" if ex.device.startswith("cuda") else "cpu"
    else:
        import torch

        device = "cuda" if ex.num_gpus > 0 or torch.cuda.is_available() else "cpu"
    gpus = ex.num_gpus if ex.num_gpus > 0 else 1.0
    if device == "cuda" and gpus > 1 and gpus != int(gpus):
        raise ConfigError(f"executor.num_gpus: {gpus:g} — a worker owns a whole number of GPUs, or a fraction of one")
    per_worker_devices = int(gpus) if device == "cuda" and gpus >= 1 else 1
    share = min(1.0, gpus) if device == "cuda" else 1.0
    split = device == "cuda" and per_worker_devices > 1
    workers_per_node = mem.workers_per_node or ex.workers
    dtype_name = str(resolve_dtype(ev.dtype, device)).removeprefix("torch.")
    itemsize = _DTYPE_BYTES[dtype_name]

    # ---------------------------------------------------------------- inputs (headers only)
    by_path: dict[str, ModelFacts] = {}
    dirs: dict = {}
    for alias, path in models.items():
        key = str(Path(path).resolve())
        if key not in by_path:
            d = open_model(path)
            dirs[key] = d
            dt: dict[str, int] = {}
            for h in d.headers.values():
                dt[h.dtype] = dt.get(h.dtype, 0) + h.nbytes
            by_path[key] = ModelFacts(str(path), [], sum(dt.values()), dt,
                                      max((h.nbytes for h in d.headers.values()), default=0))
        by_path[key].aliases.append(alias)
    inputs = list(by_path.values())
    ref = dirs[str(Path(models[reference_alias(models)]).resolve())]
    heads = ref.headers.values()
    model_params = sum(h.numel for h in heads if h.floating)
    model_bytes = sum(h.numel * itemsize if h.floating else h.nbytes for h in heads)
    largest_numel = max((h.numel for h in heads if h.floating), default=0)
    n_merge = len(models)
    # per merged tensor (float32): an upcast of each input, one task vector each, the output and one temporary
    scratch = largest_numel * 4 * (2 * n_merge + 2)
    largest_input = max(f.largest_bytes for f in inputs)
    lookahead = default_lookahead(n_merge)
    staged = (lookahead + n_merge) * largest_input  # in flight + the tensor being merged

    base_key = str(Path(models["base"]).resolve()) if "base" in models else None
    experts = len([k for k in by_path if k != base_key]) if base_key is not None else 0
    order_cache, order_cache_from = _order_cache(cfg, [h.shape for h in heads if h.floating], experts)

    # ---------------------------------------------------------------- evaluation
    shape = EvalShape.from_config(ref.config)
    measured = None if mem.max_length is not None else _longest_request(cfg, models, objectives)
    if mem.max_length is not None:
        length, length_from = mem.max_length, "memory.max_length"
    elif measured is not None and measured < shape.max_positions:
        length, length_from = measured, "the objectives' longest request (set memory.max_length to override)"
    else:
        length, length_from = shape.max_positions, "the model's max_position_embeddings (set memory.max_length)"
    evb = eval_bytes(shape, ev.batch_size, length, itemsize, device == "cuda")

    dev_budget, dev_from, host_budget, host_from = _budgets(device, mem, workers_per_node)
    if dev_budget is not None and device == "cuda":
        dev_budget = int(dev_budget * share)
    plan = MemoryPlan(
        device=device, devices_per_worker=per_worker_devices, workers=ex.workers,
        workers_per_node=workers_per_node, gpu_share=share, dtype=dtype_name, inputs=inputs,
        input_bytes=sum(f.bytes for f in inputs), model_params=model_params, model_bytes=model_bytes,
        largest_numel=largest_numel, merge_inputs=n_merge, scratch_bytes=scratch,
        staging_device_bytes=staged if device == "cuda" else 0, staging_host_bytes=staged,
        order_cache_bytes=order_cache, order_cache_from=order_cache_from,
        batch_size=ev.batch_size, max_length=length, max_length_from=length_from, eval=evb,
        device_budget=dev_budget, device_budget_from=dev_from, host_budget=host_budget,
        host_budget_from=host_from, headroom=mem.headroom,
        reserved_bytes=int(CUDA_CONTEXT) if device == "cuda" else 0, requested=mem.placement,
        split_devices=[f"cuda:{i}" for i in range(per_worker_devices)] if split else None,
    )
    _fill_needs(plan)
    return plan


def _order_cache(cfg, shapes: list[tuple[int, ...]], experts: int) -> tuple[int, str]:
    """Bytes a worker's order cache may hold (:mod:`evomerge.merge.methods.sparsify`) and why:
    min(``EVOMERGE_ORDER_CACHE_MB``, Σ over the experts and the floating tensors of what the
    space's operator caches per (expert, base) tensor pair, ``sparsify.cache_entry``) — the
    largest of the space's operators when it has several. Pairs need a base (τ = θ_k − θ0)."""
    from evomerge.merge.methods import get_operator
    from evomerge.merge.methods.sparsify import cache_entry, order_cache_limit

    per_expert = {name: sum(cache_entry(op.sparsify, s)[1] for s in shapes) if op.sparsify else 0
                  for name, op in ((n, get_operator(n)) for n in cfg.space.merge_methods())}
    name, each = max(per_expert.items(), key=lambda kv: kv[1], default=("", 0))
    if not each or not experts:
        return 0, "no operator of the space keeps an order of its task vectors"
    try:
        bound = max(0, order_cache_limit())
    except ValueError:
        raise ConfigError(f"EVOMERGE_ORDER_CACHE_MB={os.environ.get('EVOMERGE_ORDER_CACHE_MB')!r} is not a "
                          "number of megabytes (0 turns the order cache off)") from None
    total = experts * each
    why = f"{name}: {experts} expert(s) × {size(each)}, kept with resident inputs"
    if bound < total:
        return bound, f"{why}; capped by EVOMERGE_ORDER_CACHE_MB at {size(bound)}"
    return total, f"{why}; EVOMERGE_ORDER_CACHE_MB allows {size(bound)}"


def _fill_needs(p: MemoryPlan) -> None:
    k = p.devices_per_worker
    spread = lambda b: math.ceil(b / k)  # noqa: E731 — a split model spreads evenly (accelerate balances)
    cpu = p.device == "cpu"
    # Merging and evaluating never overlap: a worker's peak is what stays (the model, resident
    # inputs) plus the larger of the merge's transient (float32 scratch, staged inputs) and the
    # evaluation's (KV cache spread with the layers; activations and logits on one device).
    evaluation = spread(p.eval["kv_cache"]) + p.eval["activations"] + p.eval["logits"]
    stays = spread(p.model_bytes)
    # the order cache is kept for inputs that stay put between candidates: resident ones, and
    # pinned ones on a CPU worker (used where they lie); streamed copies are new every candidate
    cache = spread(p.order_cache_bytes)
    # On a CPU worker device and host are one RAM: a streamed tensor is used where it lies
    # (pinned) or read into it (mmap). The two budgets stay separate (both default to the
    # machine's share), so a test can force each placement with small budgets.
    rows = {
        "resident": (spread(p.input_bytes) + stays + cache + max(p.scratch_bytes, evaluation), 0,
                     "dram" if cpu else "hbm"),
        "pinned": (stays + (cache if cpu else 0) + max(p.scratch_bytes + p.staging_device_bytes, evaluation),
                   p.input_bytes, "dram" if cpu else "pcie"),
        "mmap": (stays + max(p.scratch_bytes + (p.staging_host_bytes if cpu else p.staging_device_bytes), evaluation),
                 0 if cpu else p.staging_host_bytes, "nvme"),
    }
    usable_dev, usable_host = p.usable_device, p.usable_host
    for name, (dev, host, link) in rows.items():
        why, fits = [], None
        if usable_dev is not None:
            if dev > usable_dev:
                why.append(f"needs {size(dev)} of {p.device} memory per device, {size(max(usable_dev, 0))} usable")
            if host > usable_host:
                why.append(f"needs {size(host)} of host memory, {size(usable_host)} usable")
            fits = not why
        moved = p.input_bytes if link != "hbm" else p.input_bytes + 3 * 4 * p.model_params
        p.needs[name] = PlacementNeed(name, dev, host, fits, "; ".join(why), link, moved / BANDWIDTH[link])
    order = PLACEMENT_ORDER if p.requested == "auto" else (p.requested,)
    chosen = [n for n in order if p.needs[n].fits is not False]
    p.placement = chosen[0] if chosen else None


# ---------------------------------------------------------------------- text
def size(b: int | float | None) -> str:
    """Bytes in GB, MB or kB (powers of 10)."""
    if b is None:
        return "unknown"
    if b == 0:
        return "0"
    for unit, scale in (("GB", GB), ("MB", 1e6)):
        if abs(b) >= scale:
            return f"{b / scale:,.2f} {unit}"
    return f"{b / 1e3:,.1f} kB"


def render(plan: MemoryPlan, eval_seconds: float = 0.0) -> str:
    """The plan as a few aligned lines (``evomerge plan``)."""
    p = plan
    split = f" split over {p.devices_per_worker} GPUs" if p.split_devices else ""
    share = f" ({p.gpu_share:g} of a GPU)" if p.gpu_share < 1 else ""
    lines = [
        f"memory plan per worker — {p.workers} worker(s), device {p.device}{split}{share}, merged model in {p.dtype}",
        f"  device budget   {size(p.device_budget)} per device ({p.device_budget_from}), "
        f"{p.headroom:.0%} headroom" + (f" + {size(p.reserved_bytes)} CUDA context" if p.reserved_bytes else ""),
        f"  host budget     {size(p.host_budget)} per worker ({p.host_budget_from})",
        f"  inputs          {size(p.input_bytes)} in {len(p.inputs)} model(s):",
    ]
    for f in p.inputs:
        dts = ", ".join(f"{k} {size(v)}" for k, v in f.dtypes.items())
        lines.append(f"                    {', '.join(f.aliases):<14} {size(f.bytes):>12}  ({dts})  {f.path}")
    lines += [
        f"  merged model    {size(p.model_bytes)} ({p.model_params / 1e9:.3f} B parameters in {p.dtype})",
        f"  merge scratch   {size(p.scratch_bytes)} (largest tensor {p.largest_numel:,} × 4 B × {2 * p.merge_inputs + 2})",
        f"  staging         {size(p.staging_device_bytes)} device, {size(p.staging_host_bytes)} host (streamed placements)",
        f"  order cache     {size(p.order_cache_bytes)} ({p.order_cache_from})",
        f"  evaluation      batch {p.batch_size} × {p.max_length} tokens ({p.max_length_from}): "
        + ", ".join(f"{k.replace('_', ' ')} {size(v)}" for k, v in p.eval.items()),
        "",
        f"  {'placement':<10} {'device/dev':>12} {'host':>12}  {'fits':<5} {'merge bound by':<15} {'merge s':>8} {'cand/h':>9}",
    ]
    for n in p.needs.values():
        fits = "?" if n.fits is None else ("yes" if n.fits else "no")
        per_h = 3600 / (n.merge_s + eval_seconds) if n.merge_s + eval_seconds > 0 else float("inf")
        link = f"{n.merge_link} {BANDWIDTH[n.merge_link] / GB:g} GB/s"
        lines.append(f"  {n.placement:<10} {size(n.device_bytes):>12} {size(n.host_bytes):>12}  {fits:<5} "
                     f"{link:<15} {n.merge_s:>8.3g} {per_h:>9,.0f}" + (f"   {n.why}" if n.why else ""))
    lines.append("")
    cand = "merge time only" if not eval_seconds else f"with {eval_seconds:g} s of evaluation per candidate"
    lines.append(f"  cand/h: candidates per hour per worker, {cand}")
    if p.placement is not None:
        lines.append(f"  → placement: {p.placement}" + (" (budget unknown: not checked)" if p.fits is None else ""))
    else:
        lines.append(f"  → {p.refusal()}")
    return "\n".join(lines)
