"""The report and export: a fixture run store written through the real store API, then the
loader, the Pareto/best/preference logic on hand-made numbers, the HTML (content and escaping),
PNGs, the terminal summary, the CLI, and the export round trip on tiny models.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.cli import main as cli_main
from evomerge.recipe import Recipe
from evomerge.report import (FAILED, OK, ModelInfo, ObjectiveInfo, PredictedFront, ReportData, RunFacts,
                             TrialInfo, load_report_data, render_html, write_pngs, write_report)
from evomerge.report.analysis import (best_trial, pareto_trials, prefer_trial, progress_series, staircase,
                                      throughput)
from evomerge.store import RunStore, Trial

EVIL = "<script>alert(1)</script>"
T0 = 1_700_000_000.0


# ---------------------------------------------------------------------- the fixture run store
def trial_recipe(paths: dict[str, str], i: int) -> Recipe:
    """Trial i's recipe: task arithmetic with per-group weights; some DARE-TIES, some layer flows."""
    w0 = round(0.1 + 0.8 * ((i * 7) % 11) / 10, 4)
    w1 = round(0.1 + 0.8 * ((i * 5) % 13) / 12, 4)
    method = "dare_ties" if i % 6 == 1 else "task_arithmetic"
    p0 = {"weight": {"embed": w0, "layers": [w0, round(w0 * 0.8, 4)], "head": w0}}
    p1 = {"weight": w1}
    if method == "dare_ties":
        p0["density"], p1["density"] = 0.7, [0.5, 0.9]
    recipe = {"merge_method": method, "base_model": paths["base"],
              "models": [{"model": paths["math"], "name": "math", "parameters": p0},
                         {"model": paths[EVIL], "name": EVIL, "parameters": p1}]}
    if i % 5 == 2:  # a layer flow with a non-unit scale: no mergekit equivalent
        recipe["layer_flow"] = {"slots": [{"model": "base", "layer": 0}, {"model": "merge", "layer": 1, "scale": 1.25},
                                          {"model": EVIL, "layer": 1}]}
    return Recipe.model_validate(recipe)


def trial_metrics(i: int) -> tuple[float, float]:
    w0 = 0.1 + 0.8 * ((i * 7) % 11) / 10
    w1 = 0.1 + 0.8 * ((i * 5) % 13) / 12
    return round(0.2 + 0.6 * w0 - 0.25 * w0 * w1 + 0.001 * i, 4), round(0.2 + 0.55 * w1 - 0.2 * w0 * w1, 4)


FAILED_AT = (4, 13)
N_TRIALS = 26


def make_run(run_dir: Path, paths: dict[str, str], n: int = N_TRIALS, predicted: bool = True) -> Path:
    """A finished two-objective run (cmaes, 4 per generation) with parents, failures and a predicted front."""
    config = {
        "name": "demo <b>run</b>", "seed": 7,
        "models": {"base": paths["base"], "experts": [{"model": paths["math"], "name": "math"},
                                                      {"model": paths[EVIL], "name": EVIL}]},
        "space": {"type": "ps"},
        "objectives": [{"task": "arith", "metric": "acc", "split": "search", "weight": 1.0},
                       {"task": "words", "split": "search", "weight": 0.5}],
        "validation": {"objectives": [{"task": "arith", "split": "validation"},
                                      {"task": "words", "split": "validation"}], "when": "all"},
        "optimizer": {"name": "cmaes", "options": {}}, "budget": {"evaluations": 40},
    }
    with RunStore(run_dir, create=True) as store:
        store.set_meta(config=config, name=config["name"], created=T0 - 5, status="finished",
                       updated=T0 + 10 * n + 1, elapsed=10.0 * n, space="ps space, 6 genes",
                       stopped="budget: 40 evaluations")
        refs = {"base": (0.31, 0.3), "math": (0.62, 0.22), EVIL: (0.25, 0.57)}
        for k, (alias, (a, w)) in enumerate(refs.items()):
            r = Recipe(merge_method="linear", base_model=paths["base"],
                       models=[{"model": paths["math"], "name": "math", "parameters": {"weight": float(alias == "math")}},
                               {"model": paths[EVIL], "name": EVIL, "parameters": {"weight": float(alias == EVIL)}}])
            if alias == "base":
                r = r.model_copy(update={"merge_method": "task_arithmetic"})
            store.add_trial(Trial(recipe_hash=r.hash() + alias, recipe_json=r.canonical_json(), status="ok",
                                  kind="reference", name=alias, metrics={"arith:search": a, "words:search": w},
                                  validation={"arith:validation": a - 0.01, "words:validation": w - 0.01},
                                  fitness=a + 0.5 * w, created=T0 - 1 + 0.1 * k))
        for i in range(n):
            r = trial_recipe(paths, i)
            common = dict(recipe_hash=r.hash(), recipe_json=r.canonical_json(), seq=i,
                          genome=np.array([i / n, 1 - i / n]), seconds={"total_s": 8.0},
                          info={"generation": i // 4}, created=T0 + 10 * i)
            if i in FAILED_AT:
                store.add_trial(Trial(status="failed", error=f"CUDA out of memory {EVIL}\nTraceback (most recent call last)",
                                      **common))
                continue
            a, w = trial_metrics(i)
            store.add_trial(Trial(status="ok", metrics={"arith:search": a, "words:search": w},
                                  validation={"arith:validation": round(a - 0.02, 4), "words:validation": round(w - 0.03, 4)},
                                  fitness=a + 0.5 * w, **common))
    if predicted:  # the MAP summary, as the map search stores it (objective columns in another order)
        from evomerge.search.map import save_map_summary

        pts = [[0.25 + 0.5 * t, 0.58 - 0.3 * t * t] for t in np.linspace(0, 1, 9)]
        save_map_summary(run_dir, {
            "kind": "plain", "objectives": ["words:search", "arith:search"], "signs": [1.0, 1.0],
            "genes": ["math", EVIL], "complete": True,
            "front": {"C": [[t, 1 - t] for t in np.linspace(0, 1, 9)], "M": [[w, a] for a, w in pts]},
            "r2": [0.91, 0.87], "n_evaluations": 12})
    return run_dir


FAKE_PATHS = {"base": "/nonexistent/base", "math": "/nonexistent/math", EVIL: "/nonexistent/evil"}


def build_report_data(tmp_path: Path) -> tuple[ReportData, Path]:
    """The fixture run (fake model paths) loaded as report data; used by the browser test too."""
    run = make_run(tmp_path / "run", FAKE_PATHS)
    return load_report_data(run), run


@pytest.fixture
def run_data(tmp_path) -> tuple[ReportData, Path]:
    return build_report_data(tmp_path)


def naive_front(points: dict[int, tuple[float, ...]]) -> set[int]:
    """Independent O(n²) Pareto set (maximisation) to check the report's."""
    return {i for i, p in points.items()
            if not any(all(q[k] >= p[k] for k in range(len(p))) and q != p for j, q in points.items() if j != i)}


# ---------------------------------------------------------------------- loader
def test_loader_maps_the_store(run_data):
    data, run = run_data
    assert [o.name for o in data.objectives] == ["arith", "words"]
    assert [o.weight for o in data.objectives] == [1.0, 0.5] and data.objectives[0].label == "arith (acc)"
    assert len(data.trials) == N_TRIALS and len(data.ok_trials) == N_TRIALS - 2
    assert [t.id for t in data.failed_trials] == [4 + 4, 13 + 4]  # 3 parents take ids 1-3
    t = data.trial(1 + 3)  # search trial i=0
    a, w = trial_metrics(0)
    assert t.search == {"arith": a, "words": w}
    assert t.validation == {"arith": round(a - 0.02, 4), "words": round(w - 0.03, 4)}
    assert t.optimizer == "cmaes" and t.generation == 0
    assert t.started == pytest.approx(T0 - 8.0) and t.finished == pytest.approx(T0)
    assert t.recipe["merge_method"] == "task_arithmetic" and len(t.genome) == 2
    assert "CUDA out of memory" in data.trial(8).error
    assert [(m.alias, m.role) for m in data.models] == [("base", "base"), ("math", "expert"), (EVIL, "expert")]
    assert data.models[1].search == {"arith": 0.62, "words": 0.22}
    assert data.models[2].validation == {"arith": 0.24, "words": pytest.approx(0.56)}
    assert data.run.seed == 7 and data.run.space == "ps space, 6 genes" and data.run.budget_evaluations == 40
    assert data.run.started == T0 - 5 and data.run.finished == T0 + 10 * N_TRIALS + 1
    assert data.run.status == "finished" and data.run.elapsed == 10.0 * N_TRIALS
    assert data.run.notes == ["stopped: budget: 40 evaluations",
                              "MAP surrogate fit (plain, 12 evaluations): words R²=0.910, arith R²=0.870"]
    # the predicted front's columns are reordered from the summary's keys to the objectives' order
    assert data.predicted.metrics[0] == [0.25, 0.58] and data.predicted.method == "MAP plain"
    assert data.predicted.coefficient_names == ["math", EVIL] and data.predicted.coefficients[0] == [0.0, 1.0]
    assert throughput(data).per_minute == pytest.approx(N_TRIALS / (10.0 * N_TRIALS / 60))


def test_negative_weight_means_minimise(tmp_path):
    run = make_run(tmp_path / "run", FAKE_PATHS, n=6, predicted=False)
    with RunStore(run) as store:
        cfg = store.meta("config")
        cfg["objectives"][1]["weight"] = -0.5
        store.set_meta(config=cfg)
    data = load_report_data(run)
    words = data.objectives[1]
    assert (words.direction, words.weight, words.sign) == ("minimize", 0.5, -1.0)
    t = data.ok_trials[0]
    t.fitness = None  # derived like the search's Σ weight · value
    assert data.fitness(t) == pytest.approx(t.search["arith"] - 0.5 * t.search["words"])
    expected = naive_front({x.id: (x.search["arith"], -x.search["words"]) for x in data.ok_trials})
    assert {x.id for x in pareto_trials(data)} == expected


def test_loader_errors(tmp_path):
    from evomerge.errors import EvomergeError

    with pytest.raises(EvomergeError, match="run directory not found"):
        load_report_data(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvomergeError, match="no run store"):
        load_report_data(tmp_path / "empty")
    with RunStore(tmp_path / "bare", create=True):
        pass
    with pytest.raises(EvomergeError, match="no config with objectives"):
        load_report_data(tmp_path / "bare")
    run = make_run(tmp_path / "badfront", FAKE_PATHS, n=3, predicted=False)
    with RunStore(run) as store:
        store.set_meta(map={"kind": "plain", "objectives": ["arith:search"], "front": {"C": [[0.0]], "M": [[0.1]]}})
    with pytest.raises(EvomergeError, match=r"no values for objective\(s\) \['words'\]"):
        load_report_data(run)


def test_fixture_front_matches_naive_pareto(run_data):
    data, _ = run_data
    expected = naive_front({t.id: tuple(t.search[n] for n in ("arith", "words")) for t in data.ok_trials})
    front = pareto_trials(data)
    assert {t.id for t in front} == expected and len(expected) >= 3
    assert [t.search["arith"] for t in front] == sorted((t.search["arith"] for t in front), reverse=True)


# ---------------------------------------------------------------------- analysis on hand-made numbers
def hand_data(direction: str = "maximize") -> ReportData:
    pts = {1: (0.9, 0.2), 2: (0.6, 0.6), 3: (0.1, 0.95), 4: (0.5, 0.5), 5: (0.6, 0.6), 6: (0.3, 0.1)}
    trials = [TrialInfo(i, OK, search={"a": x, "b": y}, optimizer="cmaes" if i % 2 else "random",
                        generation=(i - 1) // 2, finished=float(10 * i)) for i, (x, y) in pts.items()]
    trials.append(TrialInfo(7, FAILED, error="boom", finished=75.0))
    return ReportData(RunFacts("runs/x", started=0.0, finished=120.0),
                      [ObjectiveInfo("a"), ObjectiveInfo("b", direction=direction)], trials)


def test_pareto_best_prefer_exact():
    d = hand_data()
    assert [t.id for t in pareto_trials(d)] == [1, 2, 5, 3]  # duplicates (2, 5) both kept; 4 and 6 dominated
    assert best_trial(d).id == 2  # fitness a+b: 1.1, 1.2, 1.05, 1.0, 1.2 (tie → earliest), 0.4
    assert prefer_trial(d, [1, 0]).id == 1
    assert prefer_trial(d, [0, 1]).id == 3
    assert prefer_trial(d, [1, 1]).id == 2
    assert prefer_trial(d, [3, 1]).id == 1  # 0.75·0.9+0.25·0.2 = 0.725 > 0.6
    from evomerge.errors import EvomergeError

    with pytest.raises(EvomergeError, match="2 objective"):
        prefer_trial(d, [1, 1, 1])
    with pytest.raises(EvomergeError, match="non-negative"):
        prefer_trial(d, [-1, 1])


def test_minimised_objective_flips_the_front():
    d = hand_data("minimize")  # b is a loss now: low b is good
    assert {t.id for t in pareto_trials(d)} == {1, 6} | set()  # (0.9,0.2) and (0.3,0.1): nothing beats both
    assert prefer_trial(d, [0, 1]).id == 6
    # the staircase of a front with b minimised steps the other way, in raw units
    xs, ys = staircase(np.array([[0.9, 0.2], [0.3, 0.1]]), np.array([1.0, -1.0]), 0, 1)
    assert xs == [0.3, 0.3, 0.9] and ys == [0.1, 0.2, 0.2]


def test_progress_series_and_throughput():
    d = hand_data()
    series = {s.optimizer: s for s in progress_series(d)}
    c = series["cmaes"]  # trials 1, 3, 5 in completion order: positions 1, 3, 5
    assert c.eval_index == [1, 3, 5] and c.trial_ids == [1, 3, 5]
    assert c.fitness == pytest.approx([1.1, 1.05, 1.2])
    assert c.running_best == pytest.approx([1.1, 1.1, 1.2])
    assert c.group_x == [1, 3, 5] and c.group_label == ["generation 0", "generation 1", "generation 2"]
    r = series["random"]  # trials 2, 4, 6; generations 0, 1, 2
    assert r.group_median == pytest.approx([1.2, 1.0, 0.4])
    tp = throughput(d)
    assert (tp.evaluated, tp.failed, tp.seconds) == (6, 1, 120.0)
    assert tp.per_minute == pytest.approx(7 / 2)


def test_progress_windows_without_generations():
    trials = [TrialInfo(i, OK, search={"a": float(i % 7)}, finished=float(i)) for i in range(12)]
    d = ReportData(RunFacts("r"), [ObjectiveInfo("a")], trials)
    (s,) = progress_series(d)
    assert s.optimizer == "search" and s.group_x == [5, 10, 12]  # windows of max(5, ⌈12/20⌉) = 5
    assert s.group_median == pytest.approx([2.0, 2.0, 3.5])  # [0..4], [5,6,0,1,2], [3,4]
    assert s.running_best[-1] == 6.0


# ---------------------------------------------------------------------- HTML
def payload(html_text: str) -> dict:
    m = re.search(r'<script type="application/json" id=evomerge-data>(.*?)</script>', html_text, re.S)
    return json.loads(m.group(1))


def test_html_is_self_contained_and_complete(run_data, tmp_path):
    data, run = run_data
    out = write_report(data, tmp_path / "r.html")
    text = out.read_text()
    assert out.stat().st_size > 3_000_000  # plotly.js is inlined
    assert not re.search(r"<script[^>]+src=", text)  # (the bundle mentions a CDN only for geo maps)
    assert not re.search(r"<link[^>]+href=", text)
    d = payload(text)
    assert set(d["trials"]) == {str(t.id) for t in data.trials}
    assert d["counts"] == {"trials": N_TRIALS, "evaluated": N_TRIALS - 2, "pareto": len(pareto_trials(data))}
    fig = d["figures"]["pareto"]
    (trials_trace,) = [t for t in fig["data"] if t.get("meta") == "trials"]
    assert len(trials_trace["x"]) == N_TRIALS - 2
    assert sorted(c[1] for c in trials_trace["customdata"]) == sorted(t.id for t in data.ok_trials)
    (parents,) = [t for t in fig["data"] if t.get("meta") == "parents"]
    assert parents["x"] == [0.31, 0.62, 0.25]
    (pred,) = [t for t in fig["data"] if t.get("meta") == "predicted"]
    assert len(pred["x"]) == 9
    assert fig["layout"]["xaxis"]["title"]["text"].startswith("arith (acc)")
    # a trial's panel data: recipe, heat map, layer flow, export command, both splits
    best = best_trial(data)
    t = d["trials"][str(best.id)]
    assert d["initial"] == best.id and t["best"] and t["pareto"]
    assert t["export"] == f"evomerge export {run} --trial {best.id} --out merged-trial-{best.id}"
    assert t["grid"]["columns"] == ["embed", "L0", "L1", "head"]
    assert t["metrics"][0] == {"objective": "arith", "search": best.search["arith"], "validation": best.validation["arith"]}
    flow = d["trials"][str(data.ok_trials[2].id)]  # search trial i=2 has a layer flow
    assert flow["flow"]["slots"][1] == {"model": "merge", "layer": 1, "scale": 1.25}
    assert d["figures"]["progress"]["layout"]["xaxis"]["title"]["text"].startswith("evaluation")
    assert "Failures" in text and "CUDA out of memory" in text


def test_heat_map_values_are_the_engine_resolution(run_data):
    data, _ = run_data
    d = payload(render_html(data))
    t = next(x for x in data.ok_trials if x.recipe["merge_method"] == "dare_ties")
    grid = d["trials"][str(t.id)]["grid"]
    w0 = t.recipe["models"][0]["parameters"]["weight"]
    rows = dict(zip(grid["rows"], grid["z"]))
    assert rows["math · weight"] == [w0["embed"], *w0["layers"], w0["head"]]
    assert rows["math · density"] == [0.7, 0.7, 0.7, 0.7]
    # a gradient [0.5, 0.9] over 2 blocks: embed t=0, blocks at t=0 and 1, head t=1
    from evomerge.report.html import short_labels

    (label,) = short_labels([f"{EVIL} · density"])
    assert label == "<script>alert(…ript> · density"  # long names are cut in the middle, then escaped
    assert rows[label.replace("<", "&lt;").replace(">", "&gt;")] == [0.5, 0.5, 0.9, 0.5]
    assert short_labels(["a" * 40, "a" * 40, "b"]) == ["a" * 14 + "…" + "a" * 15, "a" * 14 + "…" + "a" * 15 + " (2)", "b"]
    assert d["heatmap_range"] == [0.0, 1.0]  # one colour scale for every trial


def test_names_from_configs_are_escaped(tmp_path):
    paths = {"base": "/x/base", "math": "/x/</script><script>window.__pwned=1</script>", EVIL: "/x/e"}
    run = make_run(tmp_path / "run", paths, n=6)
    data = load_report_data(run)
    data.run.name = "</script><script>window.__pwned=1</script>"
    data.objectives[0].metric = "<img src=x onerror=window.__pwned=1>"
    text = render_html(data)
    assert "<script>window.__pwned" not in text and "<img src=x" not in text
    assert text.count(EVIL) == 0  # not in tables, not in JSON, not in plotly labels
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # shown as text in the parents table
    d = payload(text)  # the JSON block still round-trips the exact names
    assert d["trials"]["4"]["recipe"]["models"][1]["alias"] == EVIL
    assert d["parents"][EVIL]["alias"] == EVIL


# ---------------------------------------------------------------------- PNG, text, CLI
def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_pngs(run_data, tmp_path):
    data, _ = run_data
    paths = write_pngs(data, tmp_path / "png")
    assert [p.name for p in paths] == ["pareto.png", "progress.png"]
    for p in paths:
        w, h = png_size(p)
        assert w >= 900 and h >= 550 and p.stat().st_size > 20_000
    # three objectives: a grid of pair plots
    d3 = hand_data()
    d3.objectives.append(ObjectiveInfo("c"))
    for t in d3.trials:
        if t.ok:
            t.search["c"] = t.id / 10
    (p3, _) = write_pngs(d3, tmp_path / "png3")
    w3, _ = png_size(p3)
    assert w3 > png_size(paths[0])[0]


def test_text_summary(run_data):
    from rich.console import Console

    from evomerge.report import print_summary

    data, run = run_data
    data.models[0].alias = "[bold]base"
    console = Console(record=True, width=160)
    print_summary(data, console)
    out = console.export_text()
    best = best_trial(data)
    assert "Pareto set (" in out and f"{len(pareto_trials(data))} of {N_TRIALS - 2} evaluated" in out
    assert f"evomerge export {run} --trial {best.id}" in out
    assert "[bold]base" in out and EVIL in out  # printed literally
    assert "CUDA out of memory" in out and "24 ok, 2 failed" in out


def test_report_cli(run_data, tmp_path, capsys):
    data, run = run_data
    assert cli_main(["report", str(run), "--png-dir", str(tmp_path / "png")]) == 0
    assert (run / "report.html").stat().st_size > 3_000_000
    assert (tmp_path / "png" / "pareto.png").is_file()
    out = capsys.readouterr().out
    assert "report.html" in out and "opens offline" in out
    assert cli_main(["report", str(run), "--text"]) == 0
    assert "Pareto set" in capsys.readouterr().out
    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    assert "run directory not found" in capsys.readouterr().err


# ---------------------------------------------------------------------- export
@pytest.fixture
def model_run(tiny_models, tmp_path) -> Path:
    paths = {"base": str(tiny_models["base"]), "math": str(tiny_models["e0"]), EVIL: str(tiny_models["e1"])}
    return make_run(tmp_path / "run", paths, n=8)


def _state(path_or_model) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = path_or_model if isinstance(path_or_model, torch.nn.Module) else AutoModelForCausalLM.from_pretrained(path_or_model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("i", [0, 1, 2])  # task arithmetic, DARE-TIES, layer flow with a scale
def test_export_round_trip_equals_in_place(model_run, tmp_path, capsys, i):
    from transformers import AutoModelForCausalLM

    from evomerge.merge.materialize import apply_in_place, build_model
    from evomerge.merge.sources import Sources

    data = load_report_data(model_run)
    t = data.ok_trials[i]
    out = tmp_path / f"merged-{i}"
    assert cli_main(["export", str(model_run), "--trial", str(t.id), "--out", str(out)]) == 0
    # the exported directory loads with plain transformers and equals the in-place merge
    recipe = Recipe.model_validate(t.recipe)
    src = Sources.from_recipe(recipe)
    model = build_model(src)
    apply_in_place(model, recipe, src)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    a, b = _state(model), _state(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    # recipe, card, mergekit config
    assert Recipe.load(out / "evomerge_recipe.yaml").hash() == recipe.hash()
    card = (out / "README.md").read_text()
    assert f"Trial **{t.id}**" in card and "## How it was found" in card and "optimizer `cmaes`" in card
    assert f"| arith (acc) | {t.search['arith']:.4g} | {t.validation['arith']:.4g} | 0.31 | 0.62 | 0.25 |" in card
    if recipe.layer_flow is None:
        mk = yaml.safe_load((out / "mergekit_config.yml").read_text())
        assert mk["merge_method"] == recipe.merge_method and "mergekit-yaml mergekit_config.yml" in card
        assert ("does not seed" in card) == (recipe.merge_method == "dare_ties")
    else:
        assert not (out / "mergekit_config.yml").exists()
        assert "No mergekit config: mergekit cannot express this recipe" in card
    assert f"trial {t.id}" in capsys.readouterr().out


def test_export_selectors_and_errors(model_run, tmp_path, capsys):
    from evomerge.report.export import choose_trial

    data = load_report_data(model_run)
    best = best_trial(data)
    assert choose_trial(data, best=True)[0].id == best.id
    front = pareto_trials(data)
    assert choose_trial(data, prefer=[1, 0])[0].id == max(front, key=lambda t: t.search["arith"]).id
    assert choose_trial(data, prefer=[0, 1])[0].id == max(front, key=lambda t: t.search["words"]).id
    assert cli_main(["export", str(model_run), "--best", "--out", str(tmp_path / "b")]) == 0
    assert f"Trial **{best.id}**" in (tmp_path / "b" / "README.md").read_text()
    capsys.readouterr()
    failed = data.failed_trials[0].id
    cases = [
        (["--out", str(tmp_path / "x")], "exactly one of --trial N, --best or --prefer"),
        (["--best", "--trial", "5", "--out", str(tmp_path / "x")], "exactly one of"),
        (["--trial", "999", "--out", str(tmp_path / "x")], "trial 999 is not in this run"),
        (["--trial", str(failed), "--out", str(tmp_path / "x")], f"trial {failed} did not evaluate successfully"),
        (["--prefer", "1,2,3", "--out", str(tmp_path / "x")], "3 weight(s) for 2 objective(s)"),
        (["--prefer", "a,b", "--out", str(tmp_path / "x")], "expected comma-separated numbers"),
        (["--prefer", "0,0", "--out", str(tmp_path / "x")], "not all zero"),
        (["--best", "--out", str(tmp_path / "b")], "not empty; pass --force"),
    ]
    for args, msg in cases:
        assert cli_main(["export", str(model_run), *args]) == 2, args
        err = capsys.readouterr().err
        assert msg in " ".join(err.split()), (args, err)
    assert not (tmp_path / "x").exists()


def test_export_refuses_moved_parents(tmp_path):
    run = make_run(tmp_path / "run", FAKE_PATHS, n=3, predicted=False)
    assert cli_main(["export", str(run), "--best", "--out", str(tmp_path / "o")]) == 2


# ---------------------------------------------------------------------- a real run: MAP through the search loop
class ReportFakeWorker:
    """``executor.worker: test_report:ReportFakeWorker``: two conflicting exact quadratics of the
    experts' weights w (objective k rewards w_k, penalises the others); validation = search − 0.02;
    fails when a weight exceeds ``fail_above``."""

    def __init__(self, spec, name):
        self.name, self.opts = name, dict(spec.options)
        self.keys = {"search": [o["task"] + ":" + o["split"] for o in spec.objectives],
                     "validation": [o["task"] + ":" + o["split"] for o in spec.validation]}

    def run(self, task):
        import time

        from evomerge.executors.worker import Outcome, Score, failure

        t0 = time.perf_counter()
        r = Recipe.model_validate_json(task.recipe_json)
        w = np.array([float(m.parameters.get("weight", 0.0)) for m in r.models])
        if self.opts.get("fail_above") is not None and w.max() > self.opts["fail_above"]:
            return failure(task, self.name, f"ValueError: weight {w.max():.3f} too large\nTraceback ...", t0)
        scores = {}
        for split in task.splits:
            for k, key in enumerate(self.keys[split]):
                v = 0.2 + 0.6 * w[k] - 0.3 * w[k] ** 2 - 0.2 * (np.delete(w, k) ** 2).sum() - 0.02 * (split != "search")
                scores[key] = Score(float(v), np.full(4, v, dtype=np.float32), np.arange(4))
        return Outcome(id=task.id, ok=True, scores=scores, worker=self.name, seconds={"total_s": 0.01})


def test_report_and_export_of_a_real_map_run(tiny_models, tmp_path, monkeypatch):
    from evomerge.store import RunStore
    from evomerge.search.map import run_map

    monkeypatch.chdir(tmp_path)
    cfg = {"name": "map-demo",
           "models": {"base": str(tiny_models["base"]),
                      "experts": [{"model": str(tiny_models["e0"]), "name": "math"},
                                  {"model": str(tiny_models["e1"]), "name": EVIL}]},
           "space": {"type": "task_vector", "bounds": [0.0, 1.2], "decimals": 4},
           "objectives": [{"task": "arith"}, {"task": "words"}],
           "validation": {"objectives": [{"task": "arith"}, {"task": "words"}], "when": "all"},
           "executor": {"worker": "test_report:ReportFakeWorker", "worker_options": {"fail_above": 1.1}},
           "map": {"pop_size": 30, "n_gen": 30}}
    run = tmp_path / "run"
    out = run_map(cfg, run, verify=2)
    data = load_report_data(run)
    with RunStore(run) as store:
        n_search = store.count()
        n_failed = store.count(status="failed")
    assert len(data.trials) == n_search and len(data.failed_trials) == n_failed > 0
    assert "too large" in data.failed_trials[0].error
    assert {m.alias for m in data.models} == {"base", "math", EVIL} and all(m.search for m in data.models)
    assert data.models[1].num_blocks == 2  # read from the model directory
    assert data.predicted is not None and len(data.predicted.metrics) == len(out.summary["front"]["M"])
    assert data.predicted.coefficient_names == out.summary["genes"]
    assert data.run.status == "finished" and data.run.elapsed and data.trials[0].optimizer == "map"
    assert all(t.validation for t in data.ok_trials)  # validation "all"
    expected = naive_front({t.id: (t.search["arith"], t.search["words"]) for t in data.ok_trials})
    assert {t.id for t in pareto_trials(data)} == expected and len(expected) >= 2
    d = payload(write_report(data, run / "report.html").read_text())
    assert d["counts"]["evaluated"] == len(data.ok_trials) and len(d["predicted"]) == len(data.predicted.metrics)
    assert all(p["nearest"] in {t.id for t in data.ok_trials} for p in d["predicted"])
    # export the preferred trade-off from the real run: a plain transformers model with a mergekit config
    pick = prefer_trial(data, [1, 1])
    assert cli_main(["export", str(run), "--prefer", "1,1", "--out", str(tmp_path / "merged")]) == 0
    assert f"Trial **{pick.id}**" in (tmp_path / "merged" / "README.md").read_text()
    assert yaml.safe_load((tmp_path / "merged" / "mergekit_config.yml").read_text())["merge_method"] == "task_arithmetic"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
