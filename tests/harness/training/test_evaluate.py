import pandas as pd

from harness.distributed import World
from harness.training.evaluate import evaluate
from tests.helpers.models import make_examples, tiny_model

LENGTHS = [5, 9, 17, 33, 12, 60, 7, 25, 41, 4]


def per_example(packing: bool, batch_size: int) -> pd.DataFrame:
    return evaluate(tiny_model(), make_examples(LENGTHS), batch_size=batch_size, pad_id=0, packing=packing,
                    row_length=64, device="cpu", world=World())


def test_validation_rows_are_per_example_and_complete():
    df = per_example(packing=False, batch_size=4)
    assert list(df.example_id) == sorted(f"ex-{i:03d}" for i in range(len(LENGTHS)))
    assert list(df.seq_len) == LENGTHS
    assert list(df.target_tokens) == [n - 3 for n in LENGTHS]  # 3 prompt tokens carry no loss
    assert ((df.loss_mean - df.loss_sum / df.target_tokens).abs() < 1e-12).all()


def test_packing_and_batch_size_do_not_change_per_example_losses():
    base = per_example(packing=False, batch_size=1)
    for packing, batch_size in [(False, 4), (True, 4), (True, 10)]:
        other = per_example(packing, batch_size)
        assert (other.example_id == base.example_id).all()
        assert ((other.loss_sum - base.loss_sum).abs() / base.loss_sum).max() < 1e-10, (packing, batch_size)


def test_chunked_loss_path_gives_the_same_per_example_losses():
    base = per_example(packing=True, batch_size=4)
    chunked = evaluate(tiny_model(), make_examples(LENGTHS), batch_size=4, pad_id=0, packing=True, row_length=64,
                       device="cpu", world=World(), chunk_tokens=16)
    assert ((chunked.loss_sum - base.loss_sum).abs() / base.loss_sum).max() < 1e-12


def test_training_rows_give_the_same_per_example_losses_in_one_shape(monkeypatch):
    """With tokens_per_row every forward pass has the same shape (a compiled model meets no new
    one) and the per-example losses are those of padded batches."""
    import harness.training.evaluate as ev

    shapes = []
    real_token_nll = ev.token_nll
    monkeypatch.setattr(ev, "token_nll", lambda model, batch, chunk: shapes.append(tuple(batch.input_ids.shape))
                        or real_token_nll(model, batch, chunk))
    base = per_example(packing=False, batch_size=4)
    shapes.clear()
    rows = evaluate(tiny_model(), make_examples(LENGTHS), batch_size=4, pad_id=0, packing=False, row_length=64,
                    device="cpu", world=World(), tokens_per_row=70)
    assert (rows.example_id == base.example_id).all()
    assert ((rows.loss_sum - base.loss_sum).abs() / base.loss_sum).max() < 1e-10
    assert set(shapes) == {(1, 70)} and len(shapes) == 4  # 213 tokens: four 70-token rows, first fit
