"""scripts/gpu_carry.py: the smollm2 zoo carried to the GPU machine in verified parts.

The parts are cut so that no device call moves more than its cap, join back into the same
bytes, and a missing, corrupt or foreign part is named in one line (exit code 3: the check then
falls back to the demo zoo) before anything is unpacked.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_carry", REPO / "scripts" / "gpu_carry.py")
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)

KiB = 1024


@pytest.mark.parametrize("total,extra,cap", [
    (131 * gc.MiB, 33 * gc.MiB, 57 * gc.MiB),  # the smollm2 carry: 3 parts
    (10, 5, 100), (100, 0, 57), (100, 50, 57), (1000, 0, 1000), (1001, 0, 1000), (7, 0, 1),
])
def test_parts_are_the_fewest_that_fit_and_cover_every_byte(total, extra, cap):
    sizes = gc.part_sizes(total, extra, cap)
    assert sum(sizes) == total and all(s >= 0 for s in sizes)
    assert all(s <= cap for s in sizes[:-1]) and sizes[-1] + extra <= cap
    fewest = -(-(total + extra) // cap)  # no cut can do with fewer calls
    assert len(sizes) == max(1, fewest)
    if len(sizes) > 2:
        assert len(set(sizes[:-2])) == 1  # the earlier parts are equal


def test_parts_need_room_in_the_last_call():
    with pytest.raises(gc.CarryError, match="no room for a part in the last call"):
        gc.part_sizes(100, 60, 60)


def _files(tmp: Path) -> tuple[dict[str, Path], dict]:
    src = tmp / "src"
    (src / "adapters" / "math").mkdir(parents=True)
    blobs = {"gguf/model.gguf": bytes(range(256)) * 1200, "build.json": b'{"preset": {}}',
             "adapters/math/adapter_model.safetensors": b"\x01\x02" * 40_000, "adapters/math/adapter_config.json": b"{}"}
    files = {}
    for name, data in blobs.items():
        path = src / name.replace("/", "__")
        path.write_bytes(data)
        files[name] = path
    identity = {"preset": "smollm2-ci", "digest": "d", "gguf": {"file": "gguf/model.gguf", "sha256": "x"},
                "zoo_sha256": {}}
    return files, identity


def test_parts_join_back_into_the_same_files_and_packing_is_deterministic(tmp_path):
    files, identity = _files(tmp_path)
    cap = 64 * KiB + 150 * KiB
    manifest = gc.write_parts(files, identity, tmp_path / "carry", cap, extra=40 * KiB)
    assert len(manifest["parts"]) == 3 and manifest["preset"] == "smollm2-ci"
    for part in manifest["parts"]:
        d = tmp_path / "carry" / str(part["index"])
        assert sorted(p.name for p in d.iterdir()) == [gc.MANIFEST, gc.PART]
        assert json.loads((d / gc.MANIFEST).read_text()) == manifest  # each part carries the whole manifest
    assert manifest["parts"][-1]["bytes"] + 40 * KiB <= cap - 64 * KiB
    again = gc.write_parts(files, identity, tmp_path / "carry2", cap, extra=40 * KiB)
    assert again == manifest  # same inputs, same bytes, same sha256s
    got, parts = gc.read_parts(tmp_path / "carry")
    gc.unpack(got, parts, tmp_path / "out")
    for name, path in files.items():
        assert (tmp_path / "out" / name).read_bytes() == path.read_bytes()
        assert manifest["files"][name]["sha256"] == gc.sha256_file(path)


def test_a_missing_corrupt_or_foreign_part_is_named_before_anything_is_unpacked(tmp_path, capsys):
    files, identity = _files(tmp_path)
    carry = tmp_path / "carry"
    gc.write_parts(files, identity, carry, 64 * KiB + 150 * KiB, extra=0)
    with pytest.raises(gc.CarryError, match="no carried zoo parts") as err:
        gc.read_parts(tmp_path / "nothing")
    assert err.value.code == gc.MISSING
    shutil.move(carry / "2", tmp_path / "aside")
    with pytest.raises(gc.CarryError, match=r"^part 2 of 3 is missing \(.*carry/2/part.bin\)$"):
        gc.read_parts(carry)
    assert gc.main(["status", "--carry", str(carry)]) == gc.MISSING
    assert gc.main(["status", "--carry", str(carry), "--partial-ok"]) == 0
    assert "carried part 1, part 3 so far; part 2 of 3 is missing" in capsys.readouterr().out
    shutil.move(tmp_path / "aside", carry / "2")
    data = bytearray((carry / "2" / gc.PART).read_bytes())
    data[10] ^= 1
    (carry / "2" / gc.PART).write_bytes(bytes(data))
    with pytest.raises(gc.CarryError, match="part 2 of 3 is corrupt"):
        gc.read_parts(carry)
    data[10] ^= 1
    (carry / "2" / gc.PART).write_bytes(bytes(data))
    assert gc.main(["status", "--carry", str(carry)]) == 0
    assert "all 3 parts of the smollm2-ci zoo are here and intact" in capsys.readouterr().out
    other = dict(files, **{"build.json": files["build.json"].with_name("other.json")})
    other["build.json"].write_text('{"preset": 1}')
    gc.write_parts(other, identity, tmp_path / "other", 64 * KiB + 150 * KiB, extra=0)
    shutil.rmtree(carry / "3")
    shutil.copytree(tmp_path / "other" / "3", carry / "3")
    with pytest.raises(gc.CarryError, match="parts of 2 different packs"):
        gc.read_parts(carry)


def test_zoo_refuses_a_carry_packed_for_another_checkout(tmp_path, capsys):
    """A preset whose digest changed since packing: exit 3 (fall back), one line, nothing written."""
    files, identity = _files(tmp_path)
    gc.write_parts(files, identity, tmp_path / "carry", 64 * KiB + 150 * KiB, extra=0)
    assert gc.main(["zoo", "--carry", str(tmp_path / "carry"), "--json", str(tmp_path / "r.json")]) == gc.MISSING
    err = capsys.readouterr().err
    assert "is not this checkout's" in err and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()
