"""mergekit configs in the styles found on model cards (tests/fixtures/mergekit_configs, written
for evomerge) — each is imported, merged through `evomerge merge` (which detects the format) on
tiny 4-layer Llama models built here, and the result reloaded with transformers.

Hub names in the configs are mapped onto the tiny models. Configs that rely on work outside the
Every config must pass all three stages (import, merge, reload); ``org/Lora-A`` is a real PEFT
LoRA adapter on ``org/Model-A`` and Model-A's tokenizer carries a chat template, so that
``model+lora`` and ``chat_template: auto`` are exercised for real. ``EVOMERGE_WILD_REPORT=path.json`` writes the per-config stages (the coverage numbers in
docs/operators.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_model
from evomerge.cli import main as cli_main
from evomerge.errors import ConfigError
from evomerge.merge.mergekit import recipe_from_mergekit
from evomerge.io import load_yaml_documents
from evomerge.merge.mergekit_multi import plan_documents

CONFIGS = sorted((Path(__file__).parent / "fixtures" / "mergekit_configs").glob("*.yml"))
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")


def _lora_adapter(model_dir: Path, out: Path) -> None:
    """A real PEFT LoRA adapter (random, non-zero B) on the attention projections of ``model_dir``."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(model, cfg).save_pretrained(out)
REPORT: dict[str, str] = {}


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("wild")
    base = make_model(root / "Base", 0, layers=4)
    names = {"org/Base": str(base), "org/Lora-A": str(root / "Lora-A")}
    for k, n in enumerate("ABC"):
        names[f"org/Model-{n}"] = str(make_model(root / f"Model-{n}", 40 + k, layers=4, perturb_from=base))
    _lora_adapter(root / "Model-A", root / "Lora-A")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "Model-A")
    tok.chat_template = CHATML
    tok.save_pretrained(root / "Model-A")
    return names


def _localise(text: str, hub: dict[str, str]) -> str:
    for name in sorted(hub, key=len, reverse=True):
        text = text.replace(name, hub[name])
    return text


def _stage(path: Path, out: Path) -> str:
    """The last stage this config passes: '' (none), import, merge or reload."""
    try:
        for step in plan_documents(load_yaml_documents(path), out, str(path)):
            recipe_from_mergekit(step.config, where=str(path), warn=lambda m: None)
    except ConfigError:
        return ""
    if cli_main(["merge", str(path), "--out", str(out)]) != 0:
        return "import"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(out)
        tok = AutoTokenizer.from_pretrained(out)
    except (OSError, ValueError):
        return "merge"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    if not bool(torch.isfinite(logits).all()):
        return "merge"
    template = yaml.safe_load_all(path.read_text())
    if any(isinstance(d, dict) and d.get("chat_template") for d in template) and not tok.chat_template:
        return "merge"
    return "reload"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_wild_config_imports_merges_and_reloads(config, hub, tmp_path):
    local = tmp_path / config.name
    local.write_text(_localise(config.read_text(), hub))
    reached = _stage(local, tmp_path / "out")
    REPORT[config.stem] = reached
    path = os.environ.get("EVOMERGE_WILD_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=1, sort_keys=True))
    assert reached == "reload"


def test_wild_fixtures_exist():
    assert len(CONFIGS) >= 38


EXAMPLES = os.environ.get("EVOMERGE_MERGEKIT_EXAMPLES")  # a mergekit source checkout's examples/


@pytest.mark.skipif(not EXAMPLES or not Path(EXAMPLES).is_dir(),
                    reason="set EVOMERGE_MERGEKIT_EXAMPLES to mergekit's examples/ directory (LGPL: read, not copied)")
def test_mergekit_examples_import_or_refuse_cleanly(tmp_path):
    """Every example either translates or is refused with one ConfigError (never a crash);
    the translated share is printed for the coverage record."""
    done, refused = [], {}
    for path in sorted(Path(EXAMPLES).glob("*.y*ml")):
        try:
            for step in plan_documents(load_yaml_documents(path), tmp_path / path.stem, str(path)):
                recipe_from_mergekit(step.config, where=str(path), warn=lambda m: None)
            done.append(path.name)
        except ConfigError as e:
            refused[path.name] = str(e)
    print(f"mergekit examples: {len(done)} of {len(done) + len(refused)} import; refused: {refused}")
    assert done
