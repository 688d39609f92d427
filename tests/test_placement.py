"""Placements and the memory plan (evomerge/merge/placement.py, evomerge/memory.py, docs/scale.md).

Every placement — resident, pinned (plain host memory on CPU, same code path), mmap — and the
device-map path of split models must give bit-identical merged weights and identical fitness,
for several model families; artificial memory budgets make the plan choose each placement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, char_tokenizer, make_model
from evomerge.config import SearchConfig
from evomerge.errors import ConfigError, ModelError
from evomerge.executors.worker import ModelWorker, Task
from evomerge.memory import parse_bytes, plan_worker, render
from evomerge.merge.devices import resolve_dtype, tensor_devices
from evomerge.merge.headers import read_header, write_sparse_model
from evomerge.merge.materialize import apply_in_place, build_model, merged_tensors
from evomerge.merge.placement import PLACEMENTS, read_mapped
from evomerge.merge.sources import Sources
from evomerge.models import ModelDir
from evomerge.recipe import Recipe
from evomerge.search import worker_spec
from evomerge.spaces.base import ModelPool

FIXTURES = REPO / "tests" / "fixtures" / "evals"
FAMILIES = ("llama", "qwen2", "gpt2")


def make_gpt2(path: Path, seed: int, perturb_from: Path | None = None) -> Path:
    """A tiny GPT-2 (tied head, Conv1D layers, learned positions)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=32, n_embd=32, n_layer=2, n_head=4,
                                                        n_positions=64))
    if perturb_from is not None:
        base = AutoModelForCausalLM.from_pretrained(perturb_from)
        with torch.no_grad():
            for p, q in zip(model.parameters(), base.parameters()):
                p.copy_(q + 0.05 * torch.randn_like(q))
    model.save_pretrained(path, safe_serialization=True)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """base + two experts per family."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for i, fam in enumerate(FAMILIES):
        def mk(name, seed, base=None):
            p = root / fam / name
            if fam == "gpt2":
                return make_gpt2(p, seed, base)
            return make_model(p, seed, family=fam, perturb_from=base)
        base = mk("base", 100 * i)
        out[fam] = {"base": base, "a": mk("a", 100 * i + 1, base), "b": mk("b", 100 * i + 2, base)}
    return out


def dare_recipe(models: dict[str, Path]) -> Recipe:
    """A random operator (dare_ties): the per-tensor seeded generator must not depend on placement."""
    return Recipe.model_validate({
        "merge_method": "dare_ties", "base_model": str(models["base"]), "seed": 3,
        "models": [{"model": str(models["a"]), "name": "a", "parameters": {"weight": 0.7, "density": 0.6}},
                   {"model": str(models["b"]), "name": "b", "parameters": {"weight": 0.5, "density": 0.4}}],
    })


@pytest.mark.parametrize("family", FAMILIES)
def test_every_placement_and_the_device_map_path_give_identical_weights(families, family):
    recipe = dare_recipe(families[family])
    lazy = Sources.from_recipe(recipe)
    expected = {n: t.clone() for n, t in merged_tensors(recipe, lazy)}  # the export path: lazy reads
    for kind in PLACEMENTS:
        for split in (False, True):
            model = build_model(lazy, "cpu", devices=["cpu"], split=split)
            src = lazy.place(kind, "cpu", tensor_devices(model, lazy.reference.tensor_names) if split else None)
            try:
                for _ in range(2):  # a second candidate reuses the staged state
                    apply_in_place(model, recipe, src)
                    state = model.state_dict()
                    for n, t in expected.items():
                        assert torch.equal(state[n], t), (kind, split, n)
            finally:
                src.close()
            if split:
                assert getattr(model, "hf_device_map", None) == {"": "cpu"}


def test_streamed_placements_serve_requests_off_the_announced_order(families):
    d = ModelDir(families["llama"]["a"])
    names = d.tensor_names
    cpu = torch.device("cpu")
    for kind in ("pinned", "mmap"):
        src = Sources({"a": d}).place(kind, "cpu")
        src.expect([("a", n, cpu) for n in names[:3]])
        # out of order, then a name never announced: both are served, correctly
        assert torch.equal(src.get("a", names[2]), d.get(names[2]))
        assert torch.equal(src.get("a", names[0]), d.get(names[0]))
        assert torch.equal(src.get("a", names[-1]), d.get(names[-1]))
        with pytest.raises(ModelError, match="no tensor named nope"):
            src.get("a", "nope")
        src.close()


def test_every_placement_reads_a_lora_adapter_as_peft_merges_it(tmp_path):
    """An adapter's tensors are computed on read (base + low-rank product): no placement may copy
    the base's stored bytes instead. Through the adapter directory and ``base+adapter``, every
    placement serves exactly PEFT's merge_and_unload() checkpoint."""
    pytest.importorskip("peft")
    from evomerge.merge.lora import open_model
    from test_lora import build as build_lora

    base, adapter, merged = build_lora("llama", tmp_path)
    cpu = torch.device("cpu")
    for ref in (str(adapter), f"{base}+{adapter}"):
        d = open_model(ref)
        names = d.tensor_names
        changed = [n for n in names if not torch.equal(merged[n], ModelDir(base).get(n))]
        assert changed  # the adapter changes some tensors: the test can fail
        for kind in PLACEMENTS:
            src = Sources({"a": d}).place(kind, "cpu")
            try:
                src.expect([("a", n, cpu) for n in names])
                for n in names:
                    assert torch.equal(src.get("a", n), merged[n]), (ref, kind, n)
            finally:
                src.close()


def test_placements_fill_fused_moe_experts_on_the_device_map_path(tmp_path):
    """Mixtral's per-expert checkpoint tensors feed one fused parameter (ParameterMap): every
    placement, with and without the device-map path, gives the weights transformers loads from
    the exported merge."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.export import export_model
    from test_families import build_family

    paths = build_family("mixtral", tmp_path)
    recipe = Recipe.model_validate({
        "merge_method": "ties", "base_model": paths["base"],
        "models": [{"model": paths["e0"], "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": paths["e1"], "parameters": {"weight": 0.4, "density": 0.7}}],
    })
    lazy = Sources.from_recipe(recipe)
    export_model(recipe, tmp_path / "out", lazy)
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert any(t.dim() == 3 for t in want.values())  # fused experts are there
    for kind in PLACEMENTS:
        for split in (False, True):
            model = build_model(lazy, "cpu", devices=["cpu"], split=split)
            devices = tensor_devices(model, lazy.reference.tensor_names)
            assert set(devices) == set(lazy.reference.tensor_names)  # fused parts have a device too
            src = lazy.place(kind, "cpu", devices if split else None)
            try:
                apply_in_place(model, recipe, src)
            finally:
                src.close()
            got = model.state_dict()
            for n, t in want.items():
                assert torch.equal(got[n], t), (kind, split, n)


# ---------------------------------------------------------------------- the plan chooses, the worker obeys
def config(models: dict[str, Path], **memory) -> SearchConfig:
    return SearchConfig.from_dict({
        "name": "scale",
        "models": {"base": str(models["base"]), "experts": [{"model": str(models["a"]), "name": "a"},
                                                            {"model": str(models["b"]), "name": "b"}]},
        "objectives": [{"task": "python:fx_scale:sequence_logprob"}, {"task": "fx_add", "limit": 4}],
        "budget": {"evaluations": 1},
        "evaluation": {"evals_dir": str(FIXTURES), "batch_size": 2},
        "memory": {"max_length": 16, "headroom": 0.0, **memory},
    })


def forced_budgets(models: dict[str, Path]) -> dict[str, dict]:
    """Memory budgets under which the plan must choose each placement."""
    p = plan_worker(config(models), {"base": str(models["base"]), "a": str(models["a"]), "b": str(models["b"])})
    need = p.needs
    assert need["pinned"].device_bytes < need["resident"].device_bytes
    assert need["mmap"].host_bytes < need["pinned"].host_bytes
    big = 10 ** 12
    return {
        "resident": {"device_memory": need["resident"].device_bytes, "host_memory": big},
        "pinned": {"device_memory": need["resident"].device_bytes - 1, "host_memory": need["pinned"].host_bytes},
        "mmap": {"device_memory": need["mmap"].device_bytes, "host_memory": need["pinned"].host_bytes - 1},
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_placements_give_equal_fitness(families, family, monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    models = families[family]
    recipe = dare_recipe(models).model_dump_json()
    pool = ModelPool.from_paths(str(models["base"]), config(models).models.input_models())
    results = {}
    for kind, budget in forced_budgets(models).items():
        cfg = config(models, **budget)
        spec = worker_spec(cfg, pool)
        assert spec.placement == kind
        for split in (False, True):
            spec.split = split
            worker = ModelWorker(spec, f"{kind}-{split}")
            assert type(worker.sources.placed).name == kind
            out = worker.run(Task(id=0, recipe_json=recipe))
            assert out.ok, out.error
            worker.close()
            results[kind, split] = {k: (s.value, s.per_example.tolist()) for k, s in out.scores.items()}
    first = next(iter(results.values()))
    assert len(first["python:fx_scale:sequence_logprob:search"][1]) == 4
    for key, scores in results.items():
        assert scores == first, key


def test_a_new_run_plans_its_workers_memory_once_and_the_spec_takes_that_plan(families, tmp_path, monkeypatch):
    import evomerge.memory as memory
    from evomerge.search import run_search
    from evomerge.store import RunStore

    monkeypatch.syspath_prepend(str(FIXTURES))
    models = families["llama"]
    budgets = forced_budgets(models)
    calls = []
    plan = memory.plan_worker
    monkeypatch.setattr(memory, "plan_worker", lambda *a, **k: calls.append(a[0].memory.placement) or plan(*a, **k))
    run_search(config(models, **budgets["pinned"]), tmp_path / "run")
    assert len(calls) == 1  # the preflight's plan (refusal and placement alike)
    with RunStore(tmp_path / "run") as s:
        assert s.meta("status") == "finished"
    # a plan handed over is the one the spec follows (nothing is planned again)
    pool = ModelPool.from_paths(str(models["base"]), config(models).models.input_models())
    mmap = plan(config(models, **budgets["mmap"]), pool.paths)
    spec = worker_spec(config(models, **budgets["resident"]), pool, mmap)
    assert (spec.placement, spec.devices, len(calls)) == ("mmap", None, 1)
    assert worker_spec(config(models, **budgets["resident"]), pool).placement == "resident" and len(calls) == 2


def test_a_plan_that_cannot_fit_is_refused_with_one_line(families, tmp_path):
    models = families["llama"]
    cfg = config(models, device_memory=1000, host_memory=1000).to_dict()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "EVOMERGE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "evomerge", "search", str(path), "-r", str(tmp_path / "run"), "-q"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: memory plan: a worker does not fit"), r.stderr
    assert "smaller evaluation.batch_size" in lines[0]  # the batch is what a 1000-byte budget cannot hold
    assert not (tmp_path / "run").exists()  # refused before the run directory was created
    # `evomerge plan` prints the plan and exits 1; --json carries every number
    r = subprocess.run([sys.executable, "-m", "evomerge", "plan", str(path), "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr
    d = json.loads(r.stdout)
    assert d["fits"] is False and d["placement"] is None
    assert set(d["needs"]) == {"resident", "pinned", "mmap"}


def test_forcing_a_placement_that_does_not_fit_names_the_one_that_does(families):
    models = families["llama"]
    b = forced_budgets(models)["pinned"]
    p = plan_worker(config(models, placement="resident", **b), {k: str(v) for k, v in models.items()})
    assert p.placement is None
    with pytest.raises(ConfigError, match=r"offload to host memory \(memory\.placement: pinned or auto\)"):
        p.require_fit()


def test_plan_counts_match_the_models(families):
    models = families["gpt2"]
    p = plan_worker(config(models), {k: str(v) for k, v in models.items()})
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(models["base"])
    assert p.model_params == sum(t.numel() for t in m.state_dict().values() if t.is_floating_point()) - \
        m.lm_head.weight.numel()  # the tied head is the embedding: stored and counted once
    files = sum(os.path.getsize(f) for d in models.values() for f in Path(d).glob("*.safetensors"))
    headers = sum(8 + int.from_bytes(open(f, "rb").read(8), "little")
                  for d in models.values() for f in Path(d).glob("*.safetensors"))
    assert p.input_bytes == files - headers
    assert p.dtype == "float32" and p.device == "cpu"
    assert p.eval["kv_cache"] == 2 * 2 * 2 * 16 * 4 * 8 * 4  # 2 (k,v) · layers · batch · length · heads · head_dim · 4 B


def measured_config(models: dict[str, Path]) -> SearchConfig:
    """Two lm-eval objectives (search + validation), no memory.max_length: the plan measures them."""
    d = config(models).to_dict()
    d["objectives"] = [{"task": "fx_add", "limit": 4}]
    d["validation"] = {"objectives": [{"task": "fx_add", "split": "test", "limit": 3}]}
    d["memory"] = {"headroom": 0.0}
    return SearchConfig.from_dict(d)


def test_preflight_builds_the_tasks_once_and_the_plan_measures_them(families, monkeypatch):
    from evomerge.evaluation.tasks import TaskCatalog
    from evomerge.search import preflight

    built = []
    build = TaskCatalog.build
    monkeypatch.setattr(TaskCatalog, "build", lambda self, name, split, **k: built.append((name, split))
                        or build(self, name, split, **k))
    cfg = measured_config(families["llama"])
    pf = preflight(cfg)
    plan = pf.plan
    assert built == [("fx_add", "search"), ("fx_add", "test")]  # once each: the plan reused them
    # the longest request, one character a token: question + BOS + max_gen_toks (5)
    rows = [json.loads(line)["question"] for split, n in (("search", 4), ("test", 3))
            for line in (FIXTURES / "data" / f"fx_add_{split}.jsonl").read_text().splitlines()[:n]]
    assert plan.max_length == max(map(len, rows)) + 1 + 5 < 64
    assert plan.max_length_from.startswith("the objectives' longest request")
    # planned alone (`evomerge plan`), the plan builds them itself and measures the same
    alone = plan_worker(cfg, pf.pool.paths)
    assert len(built) == 4 and alone.max_length == plan.max_length
    # memory.max_length still overrides, and nothing is measured then
    fixed = SearchConfig.from_dict({**cfg.to_dict(), "memory": {"max_length": 40}})
    assert plan_worker(fixed, pf.pool.paths).max_length == 40 and len(built) == 4


def test_the_plan_counts_the_order_cache_of_the_space_operator(families, monkeypatch):
    """TIES/breadcrumbs keep a rank table per (expert, base) tensor pair, DELLA int16 row ranks
    (merge/methods/sparsify.py), bounded by EVOMERGE_ORDER_CACHE_MB: the plan adds exactly
    that to what stays on the merge's device (resident, and pinned on CPU), and the cache of a
    real worker holds exactly what the plan said."""
    from safetensors.torch import load_file

    from evomerge.merge.methods import sparsify

    monkeypatch.delenv("EVOMERGE_ORDER_CACHE_MB", raising=False)
    models = families["llama"]
    paths = {k: str(v) for k, v in models.items()}

    def plan(operator: str):
        d = config(models).to_dict()
        d["space"] = {"type": "task_vector", "operator": operator, "fixed": {"density": 0.5}}
        d["executor"] = {"device": "cpu"}
        return plan_worker(SearchConfig.from_dict(d), paths)

    sizes = [t.numel() for t in load_file(models["base"] / "model.safetensors").values() if t.is_floating_point()]
    floating = sum(sizes)
    ta, dare, ties, crumbs, della = (plan(o) for o in ("task_arithmetic", "dare_linear", "ties", "breadcrumbs",
                                                        "della"))
    assert ta.order_cache_bytes == 0
    assert dare.order_cache_bytes == 2 * len(sizes) * 4097 * 8  # one l1 bucket histogram per pair
    assert ties.order_cache_bytes == 2 * sum(sparsify._table_bytes(n) for n in sizes)  # 2 experts, a table each
    assert crumbs.order_cache_bytes == 2 * sum(sparsify._table_bytes(n, offset=True) for n in sizes)
    assert della.order_cache_bytes == 2 * floating * 2  # int16 ranks: every row is short
    for p in (ties, della):
        grown = {k: p.needs[k].device_bytes - ta.needs[k].device_bytes for k in PLACEMENTS}
        assert grown == {"resident": p.order_cache_bytes, "pinned": p.order_cache_bytes, "mmap": 0}
        assert all(p.needs[k].host_bytes == ta.needs[k].host_bytes for k in PLACEMENTS)
    assert "ties: 2 expert(s)" in ties.order_cache_from and "order cache" in render(ties)
    # a worker merging with resident inputs caches exactly that, from the second candidate on
    recipe = Recipe.model_validate({
        "merge_method": "ties", "base_model": paths["base"],
        "models": [{"model": paths[a], "name": a, "parameters": {"weight": 0.5, "density": 0.5}} for a in "ab"]})
    src = Sources.from_recipe(recipe).resident("cpu")
    sparsify.release_order_cache()
    try:
        for _ in range(2):
            for _name, _t in merged_tensors(recipe, src):
                pass
        assert sparsify.order_cache_bytes() == ties.order_cache_bytes
    finally:
        sparsify.release_order_cache()
        src.close()
    # the bound caps it, 0 turns it off, and a bound that is not a number is one line
    monkeypatch.setenv("EVOMERGE_ORDER_CACHE_MB", "0.01")
    capped = plan("ties")
    assert capped.order_cache_bytes == int(0.01 * 2**20) < ties.order_cache_bytes
    assert capped.needs["resident"].device_bytes - ta.needs["resident"].device_bytes == int(0.01 * 2**20)
    assert "capped by EVOMERGE_ORDER_CACHE_MB" in capped.order_cache_from
    monkeypatch.setenv("EVOMERGE_ORDER_CACHE_MB", "0")
    off = plan("ties")
    assert off.order_cache_bytes == 0 and off.needs["resident"].device_bytes == ta.needs["resident"].device_bytes
    monkeypatch.setenv("EVOMERGE_ORDER_CACHE_MB", "lots")
    with pytest.raises(ConfigError, match="EVOMERGE_ORDER_CACHE_MB='lots' is not a number of megabytes"):
        plan("ties")


# ---------------------------------------------------------------------- header-only models (docs/scale.md)
LLAMA_7B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                max_position_embeddings=4096, tie_word_embeddings=False)


def sparse_zoo(root: Path, arch: dict, experts: int) -> dict[str, str]:
    out = {"base": str(write_sparse_model(root / "base", arch, "BF16"))}
    for k in range(experts):
        out[f"e{k}"] = str(write_sparse_model(root / f"e{k}", arch, "BF16"))
    return out


def sparse_config(models: dict[str, str], **extra) -> SearchConfig:
    data = {"models": {"base": models["base"], "experts": [m for a, m in models.items() if a != "base"]},
            "objectives": [{"task": "zoo_add"}], "budget": {"evaluations": 1},
            "executor": {"type": "ray", "workers": 1, "num_gpus": 1, "device": "cuda"},
            "memory": {"device_memory": "80GB", "host_memory": "1TB", "max_length": 2048}}
    for k, v in extra.items():
        data[k] = {**data.get(k, {}), **v}
    return SearchConfig.from_dict(data)


def test_header_only_7b_models_plan_without_allocating(tmp_path):
    models = sparse_zoo(tmp_path, LLAMA_7B, experts=3)
    shards = sorted(Path(models["base"]).glob("*.safetensors"))
    assert len(shards) == 3 and (Path(models["base"]) / "model.safetensors.index.json").is_file()
    assert sum(f.stat().st_size for f in shards) > 13e9  # the full size …
    assert sum(f.stat().st_blocks for f in shards) * 512 < 1e6  # … and nothing allocated (sparse)
    p = plan_worker(sparse_config(models), models)
    assert p.model_params == 6_738_415_616  # Llama-2-7B
    assert p.input_bytes == 4 * 2 * p.model_params
    assert p.dtype == "bfloat16" and p.model_bytes == 2 * p.model_params
    assert p.needs["resident"].fits is False and p.placement == "pinned"
    # two workers per GPU cannot fit: the refusal says so first
    shared = plan_worker(sparse_config(models, executor={"num_gpus": 0.5, "workers": 2}), models)
    assert shared.placement is None and "executor.num_gpus: 1" in shared.refusal()
    # float32 forced on a GPU: bf16 is suggested
    fp32 = plan_worker(sparse_config(models, evaluation={"dtype": "float32"},
                                     memory={"device_memory": "40GB"}), models)
    assert fp32.placement is None and "evaluation.dtype: bfloat16" in fp32.refusal()
    # 8 GPUs per worker: the model is split and everything is resident
    big = plan_worker(sparse_config(models, executor={"num_gpus": 8}), models)
    assert big.split_devices == [f"cuda:{i}" for i in range(8)] and big.placement == "resident"


def test_headers_are_checked(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "x.safetensors"
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(f))
    h = read_header(f)["w"]
    assert (h.shape, h.dtype, h.nbytes, h.numel) == ((2, 3), "F32", 24, 6)
    assert torch.equal(read_mapped(h), torch.arange(6, dtype=torch.float32).reshape(2, 3))
    raw = f.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(raw[:-4])
    with pytest.raises(ModelError, match="the file is truncated"):
        read_header(tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ModelError, match="corrupt safetensors file"):
        read_header(tmp_path / "junk.safetensors")


def test_dtype_and_sizes():
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert parse_bytes("80GB") == 80 * 10 ** 9 and parse_bytes("24GiB") == 24 * 2 ** 30
    assert parse_bytes("512 MB") == 512 * 10 ** 6 and parse_bytes(1000) == 1000
    for bad in ("lots", "-1GB", 0):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    with pytest.raises(Exception, match="memory size"):
        SearchConfig.from_dict({"models": {"zoo": "tiny"}, "objectives": [{"task": "t"}],
                                "budget": {"evaluations": 1}, "memory": {"device_memory": "big"}})
