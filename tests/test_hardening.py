"""Bad input, category by category: exit code 2, one line on stderr (what, where, what to do),
no traceback, no partial output, nothing deleted or changed that the user did not ask for.

Each category is tried with several instances, built here; the CLI runs in-process through
:func:`evomerge.cli.main`, the same entry point as the ``evomerge`` script.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from evomerge.cli import main

GARBAGE = bytes(range(256)) * 4 + b"\xff\xfe\x00\x81" * 64


# ---------------------------------------------------------------------- helpers
def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (to show nothing changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def write_st(path: Path, header: dict, data: bytes, length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def recipe_file(tmp: Path, base: Path, experts: list[Path], **params) -> Path:
    r = {"version": 1, "merge_method": "linear", "base_model": str(base),
         "models": [{"model": str(e), "parameters": {"weight": params.get("weight", 0.5)}} for e in experts]}
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


@pytest.fixture()
def models(tiny_models, tmp_path) -> dict[str, Path]:
    """Private copies of base and one expert (tests corrupt them)."""
    out = {}
    for k in ("base", "e0"):
        out[k] = Path(shutil.copytree(tiny_models[k], tmp_path / "in" / k))
    return out


def merge_fails(capsys, tmp_path, models, *needles) -> str:
    before = {k: tree(v) for k, v in models.items()}
    rec = recipe_file(tmp_path, models["base"], [models["e0"]])
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "merge", rec, "--out", out)
    line = assert_one_line(code, err, *needles)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left
    assert {k: tree(v) for k, v in models.items()} == before
    return line


# ---------------------------------------------------------------------- 1. corrupt weights
def _st(models) -> Path:
    return models["e0"] / "model.safetensors"


CORRUPT_WEIGHTS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-100]),
    "random bytes": lambda p: p.write_bytes(GARBAGE),
    "zero bytes": lambda p: p.write_bytes(b""),
    "four bytes": lambda p: p.write_bytes(b"\x01\x02\x03\x04"),
    "absurd header length": lambda p: p.write_bytes(struct.pack("<Q", 1 << 60) + b"{}"),
    "header longer than file": lambda p: write_st(p, {}, b"", length=10_000),
    "header not json": lambda p: p.write_bytes(struct.pack("<Q", 8) + b"\xff" * 8),
    "header is a list": lambda p: write_st(p, [], b""),  # type: ignore[arg-type]
    "offsets past the end": lambda p: write_st(
        p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "shape does not match bytes": lambda p: write_st(
        p, {"w": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 16]}}, b"\0" * 16),
    "unknown dtype": lambda p: write_st(p, {"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4),
    "overlapping tensors": lambda p: write_st(p, {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "negative shape": lambda p: write_st(p, {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
}


@pytest.mark.parametrize("kind", list(CORRUPT_WEIGHTS))
def test_corrupt_safetensors_is_one_line(kind, capsys, tmp_path, models):
    CORRUPT_WEIGHTS[kind](_st(models))
    line = merge_fails(capsys, tmp_path, models, str(_st(models)))
    assert "re-download or re-export" in line


def _shard(models, index) -> Path:
    d = models["e0"]
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    p = d / "model.safetensors.index.json"
    p.write_bytes(index if isinstance(index, bytes) else json.dumps(index).encode())
    return p


BAD_META = {
    "index not json": lambda m: _shard(m, b"{not json"),
    "index is binary": lambda m: _shard(m, GARBAGE),
    "index is a list": lambda m: _shard(m, [1, 2]),
    "index without weight_map": lambda m: _shard(m, {"metadata": {}}),
    "weight_map not a mapping": lambda m: _shard(m, {"weight_map": ["a"]}),
    "index names a missing shard": lambda m: _shard(m, {"weight_map": {"x": "nope.safetensors"}}),
    "config is a list": lambda m: (m["e0"] / "config.json").write_text("[1, 2]"),
    "config not json": lambda m: (m["e0"] / "config.json").write_text("{model_type: llama"),
    "config is binary": lambda m: (m["e0"] / "config.json").write_bytes(GARBAGE),
}


@pytest.mark.parametrize("kind", list(BAD_META))
def test_malformed_index_or_config_is_one_line(kind, capsys, tmp_path, models):
    BAD_META[kind](models)
    merge_fails(capsys, tmp_path, models, str(models["e0"]))


# ---------------------------------------------------------------------- 2. binary YAML
def _space_config(tmp_path, tiny_models, space) -> list[str]:
    cfg = {"models": {"base": str(tiny_models["base"]), "experts": [str(tiny_models["e0"])]},
           "space": space, "objectives": [{"task": "zoo_add"}], "budget": {"evaluations": 1}}
    p = tmp_path / "search.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return ["search", str(p), "--run-dir", str(tmp_path / "run"), "-q"]


@pytest.mark.parametrize("payload", [GARBAGE, b"a: 1\n\x00\x01\x02 binary", b"\xef\xbb\xbfa: [1,\n\x80\x81"],
                         ids=["random", "control chars", "bad utf8 after bom"])
@pytest.mark.parametrize("where", ["recipe", "search config", "mergekit", "space"])
def test_binary_yaml_is_one_line(where, payload, capsys, tmp_path, tiny_models):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(payload)
    args = {"recipe": ["merge", bad, "--out", tmp_path / "out"],
            "search config": ["search", bad, "--run-dir", tmp_path / "run", "-q"],
            "mergekit": ["recipe", "import-mergekit", bad, "--out", tmp_path / "out.yaml"],
            "space": None}[where] or _space_config(tmp_path, tiny_models, str(bad))
    code, _, err = run_cli(capsys, *args)
    line = assert_one_line(code, err, str(bad))
    assert "line" in line or "position" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.yaml").exists()
    assert not (tmp_path / "run").exists()


def test_binary_task_file_is_one_line(capsys, tmp_path, tiny_models):
    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / "broken.yaml").write_bytes(b"task: broken\n" + GARBAGE)
    code, _, err = run_cli(capsys, "eval", tiny_models["base"], "-t", "broken", "--evals-dir", evals,
                           "--device", "cpu")
    assert_one_line(code, err, "broken")


# ---------------------------------------------------------------------- 3. output locations
def _merge_to(capsys, tmp_path, tiny_models, out: Path, *extra: str) -> tuple[int, str]:
    rec = recipe_file(tmp_path, tiny_models["base"], [tiny_models["e0"]])
    code, _, err = run_cli(capsys, "merge", rec, "--out", out, *extra)
    return code, err


def test_out_is_a_file(capsys, tmp_path, tiny_models):
    f = tmp_path / "taken"
    f.write_text("keep me")
    for force in ((), ("--force",)):
        code, err = _merge_to(capsys, tmp_path, tiny_models, f, *force)
        assert_one_line(code, err, str(f), "is a file")
        assert f.read_text() == "keep me"


def test_out_is_a_symlink_even_with_force(capsys, tmp_path, tiny_models):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(target)
    code, err = _merge_to(capsys, tmp_path, tiny_models, link, "--force")
    assert_one_line(code, err, str(link), "symbolic link")
    assert link.is_symlink() and (target / "precious").read_text() == "x"


def test_out_parent_is_a_file(capsys, tmp_path, tiny_models):
    f = tmp_path / "file"
    f.write_text("x")
    code, err = _merge_to(capsys, tmp_path, tiny_models, f / "sub" / "out")
    assert_one_line(code, err, str(f), "not a directory")


def test_report_out_is_a_directory_and_png_dir_is_a_file(capsys, tmp_path):
    from evomerge.io import atomic_write_text
    from evomerge.errors import EvomergeError
    from evomerge.report.static import write_pngs

    d = tmp_path / "adir"
    d.mkdir()
    with pytest.raises(EvomergeError, match="is a directory"):
        atomic_write_text(d, "x")
    f = tmp_path / "pngs"
    f.write_text("x")
    with pytest.raises(EvomergeError, match="is a file"):
        write_pngs(None, f)  # type: ignore[arg-type]  # refused before the data is read
    assert f.read_text() == "x"


@pytest.mark.parametrize("cmd", ["search", "map"])
def test_run_dir_is_a_file(cmd, capsys, tmp_path, tiny_models):
    f = tmp_path / "run"
    f.write_text("x")
    cfg = _space_config(tmp_path, tiny_models, "ps")[1]
    code, _, err = run_cli(capsys, cmd, cfg, "--run-dir", f)
    assert_one_line(code, err, str(f), "is a file")
    assert f.read_text() == "x"


@pytest.mark.parametrize("err_no", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_failed_write_leaves_nothing(err_no, capsys, tmp_path, tiny_models, monkeypatch):
    """A full disk / read-only file system / denied write in the middle of an export: one line,
    and neither the output nor a temporary directory remains."""
    import evomerge.merge.export as ex

    real = ex._write_tensor
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(err_no, os.strerror(err_no))
        return real(*a, **k)

    monkeypatch.setattr(ex, "_write_tensor", failing)
    out = tmp_path / "out"
    code, err = _merge_to(capsys, tmp_path, tiny_models, out)
    assert_one_line(code, err, str(out), os.strerror(err_no))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_failed_text_write_leaves_nothing(tmp_path, monkeypatch):
    from evomerge.errors import EvomergeError
    from evomerge.io import atomic_write_text

    target = tmp_path / "r.yaml"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(EvomergeError, match=r"r\.yaml: cannot write \(No space left on device\); the disk is full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.yaml"]


def test_sqlite_disk_full_is_one_line(capsys, monkeypatch, tmp_path):
    import sqlite3

    import evomerge.cli.recipe as cli_recipe

    def boom(*a, **k):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(cli_recipe, "_emit", boom)
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "a"}]}))
    code, _, err = run_cli(capsys, "recipe", "export-mergekit", rec)
    assert_one_line(code, err, "database or disk is full", "free space")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(capsys, tmp_path, tiny_models):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, err = _merge_to(capsys, tmp_path, tiny_models, ro / "out")
        assert_one_line(code, err, str(ro / "out"), "ermission denied")
    finally:
        ro.chmod(0o700)
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(umask, tmp_path, tiny_models):
    from evomerge.io import atomic_write_text
    from evomerge.merge.export import export_model
    from evomerge.recipe import Recipe

    old = os.umask(umask)
    try:
        rec = Recipe.from_dict(yaml.safe_load(recipe_file(tmp_path, tiny_models["base"], [tiny_models["e0"]]).read_text()))
        out = export_model(rec, tmp_path / "out")
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o666 & ~umask
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p


# ---------------------------------------------------------------------- 4. silently wrong output
def test_int8_expert_is_refused(capsys, tmp_path, models):
    from safetensors.torch import load_file

    sd = load_file(str(_st(models)))
    name = next(n for n in sd if n.endswith("q_proj.weight"))
    sd[name] = (sd[name] * 100).round().to(torch.int8)
    save_file(sd, str(_st(models)), metadata={"format": "pt"})
    line = merge_fails(capsys, tmp_path, models, str(models["e0"]), name, "i8", "dequantize")
    assert "floating-point" in line


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_other_integer_weights_are_refused(dtype, capsys, tmp_path, models):
    from safetensors.torch import load_file

    sd = load_file(str(_st(models)))
    name = next(n for n in sd if n.endswith("up_proj.weight"))
    sd[name] = sd[name].abs().mul(10).to(dtype)
    save_file(sd, str(_st(models)), metadata={"format": "pt"})
    merge_fails(capsys, tmp_path, models, name, "dequantize")


@pytest.mark.parametrize("weight", [".nan", ".inf", "-.inf", "[0.5, .nan]", "{embed: 1, layers: [.inf], head: 1}",
                                    "[{filter: mlp, value: .nan}]"])
def test_non_finite_parameters_are_refused(weight, capsys, tmp_path, tiny_models):
    rec = tmp_path / "r.yaml"
    rec.write_text(f"version: 1\nmerge_method: linear\nmodels:\n- model: {tiny_models['e0']}\n  parameters:\n"
                   f"    weight: {weight}\n- model: {tiny_models['e1']}\n")
    code, _, err = run_cli(capsys, "merge", rec, "--out", tmp_path / "out")
    assert_one_line(code, err, str(rec), "weight", "finite")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["../other/model.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_leaving_the_model_directory_is_refused(target, capsys, tmp_path, models):
    other = tmp_path / "in" / "other"
    other.mkdir()
    shutil.copy(_st(models), other / "model.safetensors")
    _shard(models, {"weight_map": {"model.embed_tokens.weight": target}})
    merge_fails(capsys, tmp_path, models, "leads outside the model directory", target)


def test_config_of_another_architecture_is_refused(tmp_path, tiny_models):
    """A Qwen2 config over Llama tensors: every q_proj.bias would stay random."""
    from evomerge.errors import ModelError
    from evomerge.merge.materialize import build_model
    from evomerge.merge.sources import Sources
    from evomerge.models import ModelDir

    d = Path(shutil.copytree(tiny_models["base"], tmp_path / "m"))
    (d / "config.json").write_text((tiny_models["qwen"] / "config.json").read_text())
    with pytest.raises(ModelError, match=r"has no tensor for parameter model\.layers\.0\.self_attn\.[kqv]_proj\.bias"):
        build_model(Sources({"base": ModelDir(d)}))


def test_eval_of_mismatched_config_is_one_line(capsys, tmp_path, tiny_models):
    d = Path(shutil.copytree(tiny_models["qwen"], tmp_path / "m"))
    cfg = json.loads((tiny_models["base"] / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg))  # llama config over qwen2 tensors (extra biases)
    code, _, err = run_cli(capsys, "eval", d, "-t", "zoo_add", "--device", "cpu", "--limit", "1")
    assert_one_line(code, err, str(d), "bias", "do not belong together")


def test_int8_eval_is_refused(capsys, tmp_path, models):
    from safetensors.torch import load_file

    sd = load_file(str(_st(models)))
    sd = {k: (v * 100).round().to(torch.int8) for k, v in sd.items()}
    save_file(sd, str(_st(models)), metadata={"format": "pt"})
    code, _, err = run_cli(capsys, "eval", models["e0"], "-t", "zoo_add", "--device", "cpu", "--limit", "1")
    assert_one_line(code, err, str(models["e0"]), "i8", "dequantize")


# ---------------------------------------------------------------------- 5. rich markup in user text
@pytest.mark.parametrize("name", ["[/x]", "[bold]oops[/bold", "[link=file:///etc]a[/link]", "a[/]b"])
def test_markup_in_paths_is_printed_verbatim(name, capsys, tmp_path):
    missing = tmp_path / name / "recipe.yaml"
    code, _, err = run_cli(capsys, "merge", missing, "--out", tmp_path / "o")
    assert_one_line(code, err, str(missing))


@pytest.mark.parametrize("name", ["[/x]", "run[red]", "[b]"])
def test_runs_show_escapes_user_text(name, capsys, tmp_path):
    from evomerge.store import RunStore

    run = tmp_path / name
    with RunStore(run, create=True) as s:
        s.set_meta(status="[/broken]", space="[i]")
    code, out, err = run_cli(capsys, "runs", "show", run)
    assert code == 0, err
    assert str(run).replace("\n", "") in out.replace("\n", "") or name in out
    assert "[/broken]" in out and "[i]" in out
    with RunStore(run) as s:  # `runs list` reads names from the stored config as they are
        s.set_meta(config={"optimizer": {"name": "[/opt]"}, "space": {"type": "[i]"}})
    code, out, err = run_cli(capsys, "runs", "list", run.parent)
    assert code == 0, err
    assert "[/broken]" in out and "[/opt]" in out


# ---------------------------------------------------------------------- 6. code-running pickle
class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/evomerge-pwned",))


@pytest.mark.parametrize("payload", ["reduce", "garbage", "not a dict"])
def test_pickle_refusal_is_one_line(payload, capsys, tmp_path, models):
    d = models["e0"]
    _st(models).unlink()
    target = d / "pytorch_model.bin"
    if payload == "reduce":
        torch.save({"w": _Payload()}, target)
    elif payload == "garbage":
        target.write_bytes(GARBAGE)
    else:
        torch.save([torch.zeros(2)], target)
    rec = recipe_file(tmp_path, models["base"], [d])
    code, _, err = run_cli(capsys, "merge", rec, "--out", tmp_path / "out", "--allow-pickle")
    assert_one_line(code, err, str(target), "safetensors")
    assert not Path("/tmp/evomerge-pwned").exists()
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- 11. --force never destroys inputs
def test_merge_out_equal_to_an_input_is_refused(capsys, tmp_path, models):
    before = tree(models["e0"])
    rec = recipe_file(tmp_path, models["base"], [models["e0"]])
    for out in (models["e0"], models["base"].parent, models["e0"] / "sub"):
        code, _, err = run_cli(capsys, "merge", rec, "--out", out, "--force")
        assert_one_line(code, err, str(out), "input model", "--force")
    assert tree(models["e0"]) == before


def test_export_out_equal_to_the_run_dir_is_refused(tmp_path):
    from evomerge.errors import EvomergeError
    from evomerge.outputs import check_output_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "evomerge.sqlite").write_bytes(b"db")
    for out in (run, tmp_path, run / "best"):
        with pytest.raises(EvomergeError, match="run directory"):
            check_output_dir(out, overwrite=True, protect=[("run directory", run)])
    assert (run / "evomerge.sqlite").read_bytes() == b"db"


# ---------------------------------------------------------------------- 12. usage errors
@pytest.mark.parametrize("args,needle", [
    (["merge"], "Missing argument"),
    (["merge", "r.yaml"], "Missing option '--out'"),
    (["merge", "r.yaml", "--out", "o", "--bogus"], "No such option: --bogus"),
    (["search", "c.yaml", "--evaluations", "many"], "'--evaluations'"),
    (["nosuchcommand"], "No such command"),
])
def test_usage_errors_exit_2_without_traceback(args, needle, capsys):
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "Traceback" not in err
    assert needle in err and "Usage:" in err


# ---------------------------------------------------------------------- security: symlinks, model card
@pytest.mark.parametrize("fname", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_symlinked_copied_file_is_refused(fname, capsys, tmp_path, models):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    f = models["base"] / fname
    f.unlink(missing_ok=True)
    f.symlink_to(secret)
    merge_fails(capsys, tmp_path, models, fname, "leads outside the model directory")


def test_hub_cache_layout_is_accepted(tmp_path, tiny_models):
    """snapshots/<rev>/file → ../../blobs/<hash> is how the Hugging Face cache stores files."""
    from evomerge.models import ModelDir

    repo = tmp_path / "models--x--y"
    snap, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in tiny_models["base"].iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    assert len(ModelDir(snap).tensor_names) == len(ModelDir(tiny_models["base"]).tensor_names)


def test_model_card_escapes_user_text(tmp_path, tiny_models):
    from evomerge.merge.export import model_card
    from evomerge.recipe import Recipe

    evil = tmp_path / "a`b<script>x</script>" / "m"
    shutil.copytree(tiny_models["e0"], evil)
    rec = Recipe.from_dict({"merge_method": "linear", "models": [{"model": str(evil)}, {"model": str(tiny_models["e1"])}],
                            "parameters": {"weight": 0.5}})
    card = model_card(rec)
    parents = [line for line in card.splitlines() if line.startswith("- `")]
    assert parents[0] == f"- ``{evil}``"
    fences = [line for line in card.splitlines() if line.startswith("```")]
    assert len(fences) == 2 and fences[0] == "```yaml"


# ---------------------------------------------------------------------- Ray: addresses and the private cluster
@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1", "auto", "10.255.255.1:6379", "no-port"])
def test_unreachable_ray_address_is_one_line_fast(address, capsys, tmp_path, tiny_models, monkeypatch):
    import time

    import ray._private.services as services

    import evomerge.executors.ray_exec as rx

    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])  # no cluster on this machine
    monkeypatch.setattr(services.find_gcs_addresses, "cache_clear", lambda: None, raising=False)
    monkeypatch.setattr(rx, "PROBE_TIMEOUT_S", 2.0)
    from evomerge.store import RunStore

    args = _space_config(tmp_path, tiny_models, "ps")
    t0 = time.monotonic()
    code, _, err = run_cli(capsys, *args, "--ray-address", address)
    assert time.monotonic() - t0 < 60
    line = assert_one_line(code, err, "Ray address", "ray start --head")
    with RunStore(tmp_path / "run") as s:  # the run is marked failed, not left "running"
        assert s.meta("status") == "failed" and s.count() == 0
        assert s.meta("stopped") == "the executor did not start: " + line.removeprefix("error: ")


def test_ray_address_from_environment_is_probed(monkeypatch):
    from evomerge.errors import ConfigError
    from evomerge.executors.ray_exec import RayExecutor

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    ex = RayExecutor(None, 1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"'127\.0\.0\.1:1': no Ray cluster answers"):
        ex._init_ray()


def test_private_ray_cluster_listens_on_loopback_only():
    """Start the private cluster the Ray executor uses and list every listening socket of its
    processes: all on 127.0.0.1 (or its IPv4-mapped / IPv6 loopback form)."""
    import ipaddress

    import psutil
    import ray

    from evomerge.executors.ray_exec import RayExecutor

    if ray.is_initialized():
        pytest.skip("a Ray cluster is already attached to this process")
    ex = RayExecutor(None, 1)  # type: ignore[arg-type]
    ex.address = None
    ex._init_ray()
    try:
        temp = ex._own_temp
        assert temp is not None and stat.S_IMODE(os.stat(temp).st_mode) == 0o700
        me = psutil.Process()
        procs = {me.pid: me, **{p.pid: p for p in me.children(recursive=True)}}
        for p in psutil.process_iter(["cmdline"]):
            if temp in " ".join(p.info["cmdline"] or []):
                procs[p.pid] = p
        listening = []
        for p in procs.values():
            try:
                listening += [(p.name(), c.laddr.ip) for c in p.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                continue
        assert len(listening) >= 3, listening  # gcs, raylet, agents
        for name, ip in listening:
            addr = ipaddress.ip_address(ip)
            addr = getattr(addr, "ipv4_mapped", None) or addr
            assert addr.is_loopback, (name, ip)
    finally:
        ex.close()
    assert not os.path.exists(temp)
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") is None
