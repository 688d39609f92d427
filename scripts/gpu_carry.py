"""Carry a pretrained zoo (``smollm2``) to the GPU machine in parts, and rebuild it there.

The GPU machine (scripts/gpu_check.sh) has no network and takes at most 64 MiB per device call,
working tree included. What the ``smollm2`` zoo needs beyond the code is its GGUF base (94 MiB,
sha256-pinned in evomerge/zoo/gguf.py), its two trained LoRA adapters (fp32, 18.7 MiB each) and
the build's record (build.json): 131 MiB, so it travels as numbered parts over several calls
made while the machine stays warm (it keeps ignored files between calls; cold, it starts bare).

    python scripts/gpu_carry.py pack   [--preset smollm2] [--out .gpu_carry] [--call-mib 60] [--last PATH ...]
    python scripts/gpu_carry.py status [--carry .gpu_carry]       # which parts are here and intact
    python scripts/gpu_carry.py zoo    [--carry .gpu_carry] [--json F]  # reassemble, verify, build the zoo

``pack`` (here) writes one deterministic tar of {gguf/<file>, build.json, adapters/<expert>/...},
cut into parts ``<out>/<i>/part.bin`` with a copy of ``manifest.json`` beside each (every part's
and every file's sha256, the GGUF's equal to the pin, and the sha256 of the model files the
rebuilt zoo must have). Parts are sized so that each device call's transfer (the working tree
plus what it carries) stays within ``--call-mib``; the last call also carries ``--last`` (the
wheels and the demo zoo, so that it alone can still run the demo-zoo check if the machine went
cold in between). It prints the device calls to make, in order.

The adapters travel in fp32: bf16 would save 18.7 MiB, not a call (the payload needs three calls
either way), and fp32 keeps the rebuilt experts bit-identical to the built ones, which ``zoo``
checks.

``zoo`` (there) checks that every part is present and intact (else names the missing or corrupt
ones and exits 3), reassembles and verifies the files, puts the GGUF where
:func:`evomerge.zoo.gguf.fetch_gguf` finds it (``$EVOMERGE_CACHE/gguf``: no download) and makes
the zoo with :func:`evomerge.zoo.smollm2.assemble_pretrained`: base dequantized from the GGUF,
experts = base + adapter, no training. Same layout, preset and digest as ``build_zoo(preset)``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge.errors import EvomergeError  # noqa: E402

MiB = 1 << 20
FORMAT = 1
PART = "part.bin"
MANIFEST = "manifest.json"
MISSING = 3  # exit code of status/zoo when parts are missing or corrupt (the caller falls back)
NOT_BUILT = 4  # exit code of pack when the zoo is not built here (the caller prepares the demo zoo only)


class CarryError(EvomergeError):
    """One line for the user; exit code 2 (bad input) unless ``code`` says otherwise."""

    def __init__(self, msg: str, code: int = 2):
        super().__init__(msg)
        self.exit_code = self.code = code


def sha256_file(path: Path) -> str:
    """evomerge.zoo.gguf.sha256_file's twin, kept here because ``status`` runs on the GPU machine
    before the wheels are installed, and evomerge.zoo.gguf imports pydantic (through evomerge.io)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def tree_bytes(repo: Path = REPO) -> int:
    """What the device tool sends besides ``carry``: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    return sum((repo / p).stat().st_size for p in out.decode().split("\0") if p and (repo / p).is_file())


def path_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------- pack
def payload_files(preset: str) -> tuple[dict[str, Path], dict]:
    """Payload name → local file, and the identity the manifest records (preset, digest, pins)."""
    from evomerge.zoo.build import ZooInfo
    from evomerge.zoo.gguf import SMOLLM2, fetch_gguf
    from evomerge.zoo.smollm2 import get_pretrained, pretrained_dir

    p = get_pretrained(preset)
    root = pretrained_dir(p)
    if not (root / "zoo.json").is_file() or ZooInfo.load(root).digest != p.digest():
        raise CarryError(f"the {preset} zoo is not built here ({root}): run `evomerge zoo build {preset}` first "
                         "(it trains the LoRA experts)", code=NOT_BUILT)
    gguf = fetch_gguf()  # verified against the pin; downloaded once if the cache lacks it
    files = {f"gguf/{SMOLLM2.filename}": gguf, "build.json": root / "build.json"}
    for e in p.experts:
        for f in sorted((root / "adapters" / e.name).iterdir()):
            files[f"adapters/{e.name}/{f.name}"] = f
    zoo_files = {f"{m}/model.safetensors": root / m / "model.safetensors" for m in ("base", *(e.name for e in p.experts))}
    identity = {"preset": p.name, "digest": p.digest(), "gguf": {"file": f"gguf/{SMOLLM2.filename}",
                                                                   "sha256": SMOLLM2.gguf_sha256},
                "zoo_sha256": {k: sha256_file(v) for k, v in zoo_files.items()}}
    return files, identity


def write_payload(files: dict[str, Path], dest: Path) -> None:
    """A deterministic tar (sorted names, no owners, mtime 0): same inputs, same bytes."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = files[name].stat().st_size, 0o644, 0
            with open(files[name], "rb") as f:
                tar.addfile(info, f)


def part_sizes(total: int, extra: int, cap: int) -> list[int]:
    """Cut ``total`` bytes into the fewest parts such that every call carries at most ``cap``
    bytes, the last call carrying ``extra`` bytes besides its part; with the load balanced (the
    earlier parts equal, the last call about as heavy as each of them)."""
    if extra >= cap:
        raise CarryError(f"no room for a part in the last call: {extra / MiB:.1f} MiB travel with it, "
                         f"{cap / MiB:.1f} MiB fit (carry less with it, or raise --call-mib)")
    for n in range(1, 1000):
        if n == 1:
            if total + extra <= cap:
                return [total]
            continue
        last = max(1, -(-(total + extra) // n) - extra)
        each = -(-(total - last) // (n - 1))
        if each <= cap and last + extra <= cap:
            return [each] * (n - 2) + [total - last - each * (n - 2), last]
    raise CarryError(f"{total / MiB:.0f} MiB cannot be cut into parts of {cap / MiB:.1f} MiB")


def write_parts(files: dict[str, Path], identity: dict, out: Path, cap: int, extra: int) -> dict:
    """The payload of ``files`` cut into ``out/<i>/part.bin`` (each with the manifest beside it)
    so that no call carries more than ``cap`` bytes, the last one ``extra`` more; the manifest.
    ``out`` is replaced only once every part is written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        payload = Path(tmp) / "payload.tar"
        write_payload(files, payload)
        total = payload.stat().st_size
        sizes = part_sizes(total, extra, cap - 64 * 1024)  # each part's folder also holds the manifest (KiB)
        staged = Path(tmp) / "parts"
        staged.mkdir()
        parts = []
        with open(payload, "rb") as f:
            for i, n in enumerate(sizes, 1):
                (staged / str(i)).mkdir()
                with open(staged / str(i) / PART, "wb") as g:
                    g.write(f.read(n))
                parts.append({"index": i, "path": f"{i}/{PART}", "bytes": n, "sha256": sha256_file(staged / str(i) / PART)})
        manifest = {"format": FORMAT, **identity, "payload": {"bytes": total, "sha256": sha256_file(payload)},
                    "parts": parts,
                    "files": {k: {"bytes": v.stat().st_size, "sha256": sha256_file(v)} for k, v in sorted(files.items())}}
        text = json.dumps(manifest, indent=1) + "\n"
        for i in range(1, len(sizes) + 1):
            (staged / str(i) / MANIFEST).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(staged), out)
    return manifest


def pack(args) -> int:
    files, identity = payload_files(args.preset)
    out = Path(args.out)
    last = [Path(x) for x in args.last]
    for x in last:
        if not x.exists():
            raise CarryError(f"{x}: not there (it is to travel with the last part)")
    tree = tree_bytes()
    manifest = write_parts(files, identity, out, int(args.call_mib * MiB) - tree, sum(path_bytes(x) for x in last))
    if manifest["files"][identity["gguf"]["file"]]["sha256"] != identity["gguf"]["sha256"]:
        shutil.rmtree(out)
        raise CarryError("the GGUF does not match the pin in evomerge/zoo/gguf.py", code=1)
    total, sizes = manifest["payload"]["bytes"], manifest["parts"]
    calls = device_calls(out, manifest, last, tree)
    print(f"{args.preset} zoo (digest {identity['digest']}): {len(files)} files, {total / MiB:.1f} MiB in "
          f"{len(sizes)} parts under {out}/ (working tree {tree / MiB:.1f} MiB travels with every call)")
    for c in calls:
        print(f"  call {c['call']}: {c['mib']:.1f} MiB in all (tree + carry {', '.join(c['carry'])})")
    print("device calls, in this order, each as soon as the last one returns (the machine keeps the parts only "
          "while it stays warm, 30 s after a call):")
    for c in calls:
        print(f"  run(command={json.dumps(c['command'])}, carry={json.dumps(c['carry'])}, timeout_s={c['timeout_s']})")
    worst = max(c["mib"] for c in calls)
    if worst > args.call_mib:
        raise CarryError(f"a call would transfer {worst:.1f} MiB > {args.call_mib} MiB", code=1)
    return 0


def device_calls(out: Path, manifest: dict, last: list[Path], tree: int) -> list[dict]:
    n = len(manifest["parts"])
    calls = []
    for part in manifest["parts"]:
        i = part["index"]
        carry = [str(out / str(i))] + ([str(x) for x in last] if i == n else [])
        mib = (tree + sum(path_bytes(Path(c)) for c in carry)) / MiB
        final = i == n
        calls.append({"call": i, "carry": carry, "mib": mib, "timeout_s": 510 if final else 60,
                      "command": "scripts/gpu_check.sh" if final else "scripts/gpu_check.sh --parts"})
    return calls


# ------------------------------------------------------------------------------- status / zoo
def read_parts(carry: Path) -> tuple[dict, list[Path]]:
    """The manifest and the verified part files, in order; CarryError(code 3) naming what is
    missing or corrupt."""
    dirs = sorted((d for d in carry.glob("*") if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    manifests = {}
    for d in dirs:
        try:
            manifests[d] = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
    if not manifests:
        raise CarryError(f"no carried zoo parts under {carry}/ (none was carried, or the machine went cold "
                         "between calls)", code=MISSING)
    digests = {m["payload"]["sha256"] for m in manifests.values()}
    if len(digests) > 1:
        raise CarryError(f"{carry}/: parts of {len(digests)} different packs (re-run scripts/gpu_wheels.sh here and "
                         "carry every part again)", code=MISSING)
    manifest = next(iter(manifests.values()))
    if manifest.get("format") != FORMAT:
        raise CarryError(f"{carry}/: manifest format {manifest.get('format')}, this script reads {FORMAT}")
    n = len(manifest["parts"])
    problems, paths = [], []
    for part in manifest["parts"]:
        path = carry / part["path"]
        if not path.is_file():
            problems.append(f"part {part['index']} of {n} is missing ({path})")
        elif path.stat().st_size != part["bytes"] or sha256_file(path) != part["sha256"]:
            problems.append(f"part {part['index']} of {n} is corrupt ({path}: sha256 differs from the manifest)")
        paths.append(path)
    if problems:
        raise CarryError("; ".join(problems), code=MISSING)
    return manifest, paths


def status(args) -> int:
    carry = Path(args.carry)
    try:
        manifest, _ = read_parts(carry)
    except CarryError as e:
        if e.code != MISSING:
            raise
        present = sorted(d.name for d in carry.glob("*") if (d / PART).is_file()) if carry.is_dir() else []
        print(f"carried {', '.join(f'part {x}' for x in present) or 'nothing'} so far; {e}")
        return 0 if args.partial_ok else MISSING
    print(f"all {len(manifest['parts'])} parts of the {manifest['preset']} zoo are here and intact "
          f"({manifest['payload']['bytes'] / MiB:.1f} MiB)")
    return 0


def unpack(manifest: dict, parts: list[Path], dest: Path) -> None:
    """Concatenate, verify and extract the payload into ``dest`` (its files verified too)."""
    dest.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    blob = io.BytesIO()
    for p in parts:
        data = p.read_bytes()
        h.update(data)
        blob.write(data)
    if h.hexdigest() != manifest["payload"]["sha256"]:
        raise CarryError("the reassembled payload's sha256 differs from the manifest", code=MISSING)
    blob.seek(0)
    with tarfile.open(fileobj=blob, mode="r:") as tar:
        names = sorted(tar.getnames())
        if names != sorted(manifest["files"]):
            raise CarryError(f"the payload holds {names}, the manifest lists {sorted(manifest['files'])}")
        tar.extractall(dest, filter="data")
    for name, want in manifest["files"].items():
        if sha256_file(dest / name) != want["sha256"]:
            raise CarryError(f"{name}: sha256 differs from the manifest after extraction", code=MISSING)


def zoo(args) -> int:
    t0 = time.perf_counter()
    manifest, parts = read_parts(Path(args.carry))
    from evomerge.paths import cache_root
    from evomerge.zoo.gguf import SMOLLM2, fetch_gguf
    from evomerge.zoo.smollm2 import assemble_pretrained, get_pretrained

    p = get_pretrained(manifest["preset"])
    if p.digest() != manifest["digest"] or manifest["gguf"]["sha256"] != SMOLLM2.gguf_sha256:
        raise CarryError(f"the carried {manifest['preset']} zoo (digest {manifest['digest']}) is not this checkout's "
                         f"(digest {p.digest()}): re-run scripts/gpu_wheels.sh from this checkout", code=MISSING)
    with tempfile.TemporaryDirectory(prefix="gpu-carry-") as tmp:
        unpack(manifest, parts, Path(tmp))
        gguf_dir = cache_root() / "gguf"
        gguf_dir.mkdir(parents=True, exist_ok=True)
        target = gguf_dir / SMOLLM2.filename
        if not target.is_file() or sha256_file(target) != SMOLLM2.gguf_sha256:
            shutil.move(str(Path(tmp) / manifest["gguf"]["file"]), target)
        fetch_gguf()  # verifies the pin; finds the file, so nothing is downloaded
        t1 = time.perf_counter()
        import torch

        torch.set_num_threads(min(8, os.cpu_count() or 1))
        info = assemble_pretrained(p, Path(tmp))
    t2 = time.perf_counter()
    same = {k: sha256_file(info.root / k) == v for k, v in manifest["zoo_sha256"].items()}
    result = {"preset": info.preset, "digest": info.digest, "root": str(info.root), "cached": info.cached,
              "unpack_s": round(t1 - t0, 1), "assemble_s": round(t2 - t1, 1), "verify_s": round(time.perf_counter() - t2, 1),
              "bit_identical": same}
    print(f"{info.preset} zoo {'reused' if info.cached else 'assembled'} at {info.root}: unpacked in "
          f"{result['unpack_s']} s, {'found' if info.cached else 'merged'} in {result['assemble_s']} s; "
          f"weights identical to the zoo built here: "
          + ", ".join(f"{k.split('/')[0]} {'yes' if v else 'NO'}" for k, v in same.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="here: cut the zoo's carry into parts and print the device calls")
    a.add_argument("--preset", default="smollm2")
    a.add_argument("--out", default=".gpu_carry")
    a.add_argument("--call-mib", type=float, default=60.0, help="most MiB one call transfers, working tree included")
    a.add_argument("--last", nargs="*", default=[], help="paths carried with the last part (wheels, demo zoo)")
    a.set_defaults(fn=pack)
    s = sub.add_parser("status", help="there: which parts are here and intact")
    s.add_argument("--carry", default=".gpu_carry")
    s.add_argument("--partial-ok", action="store_true", help="exit 0 while parts are still to come")
    s.set_defaults(fn=status)
    z = sub.add_parser("zoo", help="there: reassemble the parts and build the zoo from them")
    z.add_argument("--carry", default=".gpu_carry")
    z.add_argument("--json", help="also write the result here")
    z.set_defaults(fn=zoo)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except EvomergeError as e:  # CarryError, and the zoo's own (a foreign build.json, a bad GGUF, ...)
        print(f"gpu_carry {args.cmd}: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
