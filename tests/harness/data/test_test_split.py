"""The test split of every source: held out from training and validation, evaluated once at the
end. For the embedded data it is generated after the other examples, so training and
validation are exactly what they were without it."""

import pytest
from omegaconf import OmegaConf

from harness.config import CONF_DIR, ConfigError, validate
from harness.data import synthetic_chat
from harness.data.sources import DataError, load_source
from harness.data.tokenise import prepare_data
from harness.model.chat_tokenizer import build_char_tokenizer


def synthetic(**over):
    return OmegaConf.merge(OmegaConf.load(CONF_DIR / "data" / "synthetic.yaml"), over)


def test_synthetic_test_examples_come_after_train_and_validation_which_stay_as_they_were():
    source = load_source(synthetic(num_train=40, num_val=10, num_test=12))
    before = synthetic_chat.generate(50, 1234)  # what train and validation were made of before the test split
    assert list(source.train["example_id"]) + list(source.val["example_id"]) == [r["example_id"] for r in before]
    assert list(source.train["messages"]) + list(source.val["messages"]) == [r["messages"] for r in before]
    assert list(source.test["example_id"]) == [f"syn-{i:06d}" for i in range(50, 62)]
    assert list(source.test["row"]) == list(range(12)) and list(source.val["row"]) == list(range(10))
    data = prepare_data(synthetic(num_train=40, num_val=10, num_test=12), build_char_tokenizer())
    assert len(data.test) == 12 and not {e.example_id for e in data.test} & {e.example_id for e in data.train}


@pytest.mark.parametrize("case, expected", [
    ("empty", "leaves no test example; the test split must hold examples"),
    ("overlap", r"1 example id\(s\) are both test and training examples \(e.g. 'syn-000003'\)"),
])
def test_a_test_split_that_is_empty_or_overlaps_training_is_refused(monkeypatch, case, expected):
    cfg = synthetic(num_train=20, num_val=5, num_test=0 if case == "empty" else 4)
    if case == "overlap":
        import harness.data.tokenise as tokenise
        real = tokenise.load_source

        def leaky(c):
            source = real(c)
            source.test = source.test.map(lambda r, i: {"example_id": "syn-000003" if i == 0 else r["example_id"]},
                                          with_indices=True)
            return source
        monkeypatch.setattr(tokenise, "load_source", leaky)
    with pytest.raises(DataError, match=expected):
        prepare_data(cfg, build_char_tokenizer())


def test_test_settings_are_checked():
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        for overrides, expected in [
            (["data.num_test=0"], "data.num_test=0 must be >= 1"),
            (["data=sharegpt", "data.test_fraction=1.5"], "data.test_fraction=1.5 must be a number between 0 and 1"),
            (["data=sharegpt", "data.val_fraction=0.5", "data.test_fraction=0.5"], "leave nothing to train on"),
            (["data=hf", "data.path=json", "data.test_fraction=0"], "data.test_fraction=0 must be a number"),
        ]:
            with pytest.raises(ConfigError, match=expected):
                validate(compose("train", overrides=overrides))
