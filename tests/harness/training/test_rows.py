"""`trainer.tokens_per_micro_batch=auto` (harness/training/step.py: choose_rows): rows at least
90% full on realistic length distributions, in few shapes, with the semantic split's gradient."""

import random

import pytest

from harness.data.batching import Example
from harness.data.chat_format import IGNORE
from harness.data.data_order import training_order
from harness.data.tokenise import PreparedData
from harness.distributed import World
from harness.training.reduction import MODES
from harness.training.step import (MAX_SHORT_ROWS, ROW_FILL_TARGET, Split, choose_rows, fitting_length, plan_step)
from tests.helpers.gradients import TOL, UNEQUAL, chunks_of, formula_grad, harness_grad
from tests.helpers.models import make_examples, rel_err


def of_lengths(lengths, prompt: int = 10) -> list[Example]:
    """Examples with these token counts (ids do not matter to the rows)."""
    return [Example(f"ex-{i:05d}", [1] * n, [IGNORE] * min(prompt, n - 1) + [1] * (n - min(prompt, n - 1)))
            for i, n in enumerate(lengths)]


def synthetic_lengths() -> list[int]:
    """The embedded chat data's tokenised lengths (the default run's data, 2,000 conversations)."""
    from omegaconf import OmegaConf

    from harness.config import CONF_DIR
    from harness.data.tokenise import prepare_data
    from harness.model.loading import load_tokenizer
    data_cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "data" / "synthetic.yaml"), {"num_train": 2000, "num_val": 8})
    tokenizer = load_tokenizer(OmegaConf.load(CONF_DIR / "model" / "tiny_llama.yaml"))
    return [e.seq_len for e in prepare_data(data_cfg, tokenizer).train]


def sharegpt_like_lengths(n: int = 3000, seed: int = 0) -> list[int]:
    """Long-tailed chat lengths like the ShareGPT preset's (median ~1,200, dropped above 2,048)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        length = int(rng.lognormvariate(7.0, 0.6)) + rng.randint(20, 300)
        if length <= 2048:
            out.append(length)
    return out


def long_reply_lengths(n: int = 3000, seed: int = 0) -> list[int]:
    """The benchmark's long replies: prompts of 20-300 tokens, log-normal replies up to 2,000."""
    rng = random.Random(seed)
    return [rng.randint(20, 300) + min(2000, max(2, int(rng.lognormvariate(5.0, 1.0)))) for _ in range(n)]


def measured_fill(examples, steps, split, world_size=1) -> tuple[float, set[int]]:
    """Real / row tokens over every step of the run as plan_step lays it out, and the row lengths run."""
    real = run = 0
    shapes = set()
    for rank in range(world_size):
        world = World(rank=rank, size=world_size)
        for step in steps:
            plan = plan_step(examples, step, mode="mean", loss_scale=1.0, split=split, world=world,
                             layout=dict(pad_id=0, packing=True, row_length=split.tokens_per_micro_batch))
            real, run = real + plan.real_tokens, run + plan.row_tokens
            shapes |= {b.input_ids.shape[1] for b in plan.batches}
            assert all(b.input_ids.shape[0] == 1 for b in plan.batches)
    return real / run, shapes


def test_equal_lengths_get_the_one_row_that_holds_a_step():
    """Known answer: 10 sequences of 100 tokens a step fill one 1,024-token row (the longest
    multiple of 256 that is >= 90% full) to 1,000/1,024."""
    examples = of_lengths([100] * 40)
    steps = training_order(40, 10, 8, seed=0)
    rows = choose_rows(examples, steps, Split(2), 1, longest=100, most=4096)
    assert rows.tokens == 1024 and rows.lengths == (1024,)
    assert rows.fill == pytest.approx(1000 / 1024)
    assert rows.rows_per_step == (1,)


def test_rows_never_exceed_the_cap_and_always_hold_the_longest_example():
    examples = of_lengths([100] * 40)
    steps = training_order(40, 10, 8, seed=0)
    assert choose_rows(examples, steps, Split(2), 1, longest=100, most=512).tokens <= 512
    assert choose_rows(examples, steps, Split(2), 1, longest=700, most=512).tokens == 768  # the example wins


CASES = {  # name: (lengths, batch size, grad_accum, physical ranks, cap)
    "synthetic, the default split": (synthetic_lengths, 16, 2, 1, 32768),
    "synthetic, 128 x 2 (the 0.5B benchmark's)": (synthetic_lengths, 128, 2, 1, 32768),
    "sharegpt-like, 32 x 1": (sharegpt_like_lengths, 32, 1, 1, 32768),
    "sharegpt-like, 32 x 32 (one sequence per micro-batch)": (sharegpt_like_lengths, 32, 32, 1, 32768),
    "sharegpt-like, 32 x 1, rows of at most 16,384": (sharegpt_like_lengths, 32, 1, 1, 16384),
    "long replies, 64 x 64": (long_reply_lengths, 64, 64, 1, 32768),
    "long replies, 64 x 2 on 2 ranks": (long_reply_lengths, 64, 2, 2, 32768),
}


@pytest.mark.parametrize("case", CASES)
def test_auto_rows_are_at_least_90_percent_full_in_few_shapes(case):
    """Measured over a whole 150-step run as plan_step lays it out (the choice sees its first 64
    steps only), every shape counted."""
    lengths, batch, accum, ranks, cap = CASES[case]
    examples = of_lengths(lengths())
    steps = training_order(len(examples), batch, 150, seed=3)
    rows = choose_rows(examples, steps, Split(accum), ranks, longest=max(e.seq_len for e in examples), most=cap)
    split = Split(accum, None, rows.tokens, rows.lengths[:-1])
    fill, shapes = measured_fill(examples, steps, split, ranks)
    assert fill >= ROW_FILL_TARGET, (rows, fill)
    assert shapes <= set(rows.lengths) and len(rows.lengths) <= 1 + MAX_SHORT_ROWS
    assert rows.tokens <= cap
    again = choose_rows(examples, steps, Split(accum), ranks, longest=max(e.seq_len for e in examples), most=cap)
    assert again == rows  # deterministic


def test_a_row_is_cut_to_the_shortest_length_that_holds_it():
    assert fitting_length(100, (128, 256, 512)) == 128
    assert fitting_length(128, (128, 256, 512)) == 128
    assert fitting_length(129, (128, 256, 512)) == 256
    assert fitting_length(500, (128, 256, 512)) == 512


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("grad_accum", [1, 8])
def test_auto_rows_give_the_semantic_splits_gradient(mode, grad_accum):
    """float64: rows of several lengths chosen as `auto` chooses them (a small granule, so these
    short examples need several) give the formula's gradient for the semantic split, as an
    explicit row length does."""
    examples = make_examples(UNEQUAL)
    rows = choose_rows(examples, [list(range(len(examples)))], Split(grad_accum), 1,
                       longest=max(e.seq_len for e in examples), most=64, granule=8)
    assert len(rows.lengths) > 1  # the shorter rows are exercised
    got = harness_grad(examples, mode, grad_accum, tokens_per_micro_batch=rows.tokens, shorter_rows=rows.lengths[:-1])
    expected = formula_grad(examples, mode, chunks_of(len(examples), grad_accum))
    assert rel_err(got, expected) <= TOL
    explicit = harness_grad(examples, mode, grad_accum, tokens_per_micro_batch=128)
    assert rel_err(got, explicit) <= TOL


@pytest.mark.slow
def test_a_sweep_with_auto_rows_gives_both_modes_the_same_rows_and_logs_their_fill(tmp_path):
    """`python -m harness -m reduce_loss=mean,sum trainer.tokens_per_micro_batch=auto` (QUICK
    settings): both runs of the pair run the same rows, and say how full they were. About 40 s."""
    from tests.helpers.cli import QUICK, child_runs, run_cli
    proc = run_cli(["-m", "reduce_loss=mean,sum", "trainer.tokens_per_micro_batch=auto", *QUICK,
                    "hydra.callbacks.sweep_tracking.analyse=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = child_runs(tmp_path)
    assert len(runs) == 2 and runs["metrics.train/row_tokens"].nunique() == 1
    assert runs["metrics.train/row_fill_mean"].nunique() == 1  # the same rows, the same fill
    assert runs["tags.pair_id"].nunique() == 1  # auto stays a pair
    fill = runs["metrics.train/row_fill_mean"].iloc[0]
    assert 0.5 < fill <= 1.0
    for key in ("time/setup_s", "time/first_step_s", "time/train_s", "time/eval_s", "time/wall_s"):
        assert (runs[f"metrics.{key}"] >= 0).all(), key
    assert (runs["metrics.time/wall_s"] >= runs["metrics.time/train_s"] + runs["metrics.time/eval_s"]).all()


def test_auto_row_lengths_bounds_the_shapes():
    examples = of_lengths(sharegpt_like_lengths())
    steps = training_order(len(examples), 32, 64, seed=3)
    longest = max(e.seq_len for e in examples)
    one = choose_rows(examples, steps, Split(1), 1, longest=longest, most=32768, short_rows=0)
    two = choose_rows(examples, steps, Split(1), 1, longest=longest, most=32768, short_rows=1)
    four = choose_rows(examples, steps, Split(1), 1, longest=longest, most=32768)
    assert len(one.lengths) == 1 and len(two.lengths) <= 2 and len(four.lengths) <= 4
    assert four.fill >= ROW_FILL_TARGET
    # with one length, long rows leave a step's last row mostly empty: the 90% rows are shorter
    assert one.tokens < four.tokens


def test_every_job_of_a_sweep_over_seeds_and_lengths_gets_the_same_rows():
    """Rows are planned on seed 0's order, whatever the run's seed and max_steps: a sweep over seeds,
    modes or learning rates compiles them once. (On this data each seed's own order would choose
    other rows: checked first, so the test can tell.)"""

    from omegaconf import OmegaConf

    from harness.training.loop import physical_split
    from harness.training.step import PLANNED_STEPS
    data = PreparedData(train=of_lengths(long_reply_lengths(400)), val=of_lengths([900]))
    own = {seed: choose_rows(data.train, training_order(400, 32, PLANNED_STEPS, seed), Split(1), 1,
                             longest=max(e.seq_len for e in data.train), most=32768).lengths for seed in (0, 1)}
    assert own[0] != own[1]
    splits = set()
    for seed, steps, mode in [(0, 24, "mean"), (1, 24, "sum"), (1, 150, "mean")]:
        cfg = OmegaConf.create({"seed": seed, "reduce_loss": mode, "trainer": {
            "batch_size": 32, "grad_accum": 1, "world_size": None, "max_steps": steps,
            "tokens_per_micro_batch": "auto", "max_tokens_per_micro_batch": 32768, "auto_row_lengths": 4}})
        split, rows = physical_split(cfg, data, World())
        assert split.row_lengths == rows.lengths == own[0]
        splits.add(split)
    assert len(splits) == 1
