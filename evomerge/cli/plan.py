"""`evomerge plan CONFIG`: the memory plan of a search's workers, before anything starts.

``--json`` prints :meth:`evomerge.memory.MemoryPlan.to_dict` as one object: every field of the
plan (``device``, ``devices_per_worker``, ``workers``, ``dtype``, ``inputs`` [{``path``,
``aliases``, ``bytes``, ``dtypes``, ``largest_bytes``}], ``input_bytes``, ``model_params``,
``model_bytes``, ``scratch_bytes``, ``staging_device_bytes``, ``staging_host_bytes``,
``order_cache_bytes`` (per worker, on the merge's device; ``order_cache_from`` says why), ``eval``
{``kv_cache``, ``activations``, ``logits``}, ``device_budget``, ``host_budget``, ``headroom``,
``needs`` {placement: {``device_bytes``, ``host_bytes``, ``fits``, ``why``, ``merge_link``,
``merge_s``}}, ``requested``, ``placement`` (null when nothing fits), ``split_devices``) plus
``fits``, ``eval_bytes``, ``usable_device``, ``usable_host`` and
``candidates_per_hour_merge_bound`` {placement: number | null}. Sizes are bytes; an unknown
budget is null. Exit code 1 when nothing fits (as ``search`` would refuse), 2 for a bad config.
"""

from __future__ import annotations

import typer

from evomerge.cli import app, console
from evomerge.cli.output import emit_json
from evomerge.paths import resolve_config


@app.command()
def plan(
    config: str = typer.Argument(..., help="Search config (YAML), or example:NAME for a shipped example."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as one JSON object."),
    eval_seconds: float = typer.Option(0.0, "--eval-seconds", min=0.0,
                                       help="Seconds one candidate's evaluation takes (for candidates/hour)."),
    workers: int = typer.Option(None, "--workers", help="Plan for this many workers (more than 1 means Ray)."),
    zoo: str = typer.Option(None, "--zoo", help="Use this zoo preset for a `models: {zoo: ...}` config."),
) -> None:
    """Memory per worker: inputs, merged model, merge scratch, evaluation batch; the placement
    that fits (resident, pinned, mmap). Exit code 1 when nothing fits (as `search` would refuse)."""
    from evomerge.cli.search import _executor_overrides, load_search_config
    from evomerge.config import SearchConfig
    from evomerge.memory import plan_worker, render
    from evomerge.search import resolve_models

    cfg = load_search_config(resolve_config(config), zoo=zoo).resolved()
    overrides = _executor_overrides(None, workers)
    if overrides:
        cfg = SearchConfig.from_dict({**cfg.to_dict(), "executor": {**cfg.executor.model_dump(), **overrides}},
                                     where="command-line options")
    p = plan_worker(cfg, resolve_models(cfg).paths)
    if as_json:
        emit_json(p.to_dict())
    else:
        console.print(render(p, eval_seconds), highlight=False, markup=False, soft_wrap=True)
    if p.placement is None:
        raise typer.Exit(1)
