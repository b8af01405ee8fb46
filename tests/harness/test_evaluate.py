import pandas as pd

from harness.distributed import World
from harness.evaluate import evaluate
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
