"""Training throughput on one GPU, side by side with Hugging Face Trainer, in one process.

    python benchmarks/gpu_throughput.py --model qwen0.5b --data embedded
    python benchmarks/gpu_throughput.py --model smollm135m --data long --regime

The same model (random init, no download) trains on the same tokenised examples in the same
order for the same steps with
  harness      the harness's training step at its fast settings: sequences packed into rows of
               --tokens-per-micro-batch tokens (FlexAttention document mask), chunked loss,
               torch.compile, fused AdamW, bf16 autocast over float32 weights, steps planned
               ahead in a thread; every reduction mode, interleaved rounds
  harness-plain the step as it was before these settings: the semantic micro-batches run as
               they are (padded), plain loss over full float32 logits, no compile; then the
               same micro-batches with the chunked loss (peak memory)
  trainer-pad  HF Trainer, DataCollatorForSeq2Seq padding, bf16, fused AdamW
  trainer-liger the same with use_liger_kernel=True (Liger's RMSNorm, SwiGLU, RoPE and fused
               linear cross-entropy; pip install liger-kernel==0.8.5, else the row is skipped)
  trainer-flat HF Trainer, DataCollatorWithFlattening (padding-free) with FlexAttention
Real tokens/s counts non-padding tokens. MFU = 6 * (non-embedding parameters + vocabulary *
hidden) * tokens/s / 989e12 (dense bf16 peak of an H100/H200 SXM).
--regime adds the study regime where the reduction matters most: the semantic split of one
sequence per micro-batch (batch 64, accumulation 64) in every mode, run physically in packed rows,
paired with the same rows as one semantic micro-batch; then the 64 micro-batches run literally.
Each harness line is preceded by its compile and warm-up time. On a fresh H200 machine the first
compile took about 2 minutes for the 0.5B shape and 5 for the SmolLM2 shape (30 layers); give a
run --model smollm135m --regime 10 minutes. Processes after it reuse inductor's cache on disk.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import time
from contextlib import nullcontext

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from harness.data.batching import Example
from harness.data.chat_format import IGNORE
from harness.config import CONF_DIR
from harness.distributed import World
from harness.training.losses import CausalLMLoss
from harness.training.prefetch import ahead
from harness.training.reduction import MODES
from harness.training.step import Split, plan_step, run_step
from harness.data.data_order import training_order

PEAK_FLOPS = 989e12
MODELS = {
    "qwen0.5b": lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6)),
    "smollm135m": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)),
}


def embedded_examples(n: int, vocab: int) -> list[Example]:
    """The embedded synthetic chat set, tokenised as the default run does (char tokenizer)."""
    from omegaconf import OmegaConf

    from harness.model.loading import load_tokenizer
    from harness.data.tokenise import prepare_data
    data_cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "data" / "synthetic.yaml"), {"num_train": n, "num_val": 8})
    return prepare_data(data_cfg, load_tokenizer(OmegaConf.load(CONF_DIR / "model" / "tiny_llama.yaml"))).train


def long_examples(n: int, vocab: int, seed: int = 0) -> list[Example]:
    """Long-tailed chat lengths: prompts of 20-300 tokens, replies log-normal up to 2,000."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = rng.randint(20, 300)
        reply = min(2000, max(2, int(rng.lognormvariate(5.0, 1.0))))
        ids = [rng.randrange(3, vocab) for _ in range(prompt + reply)]
        out.append(Example.from_labels(f"long-{i:06d}", ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def flops_per_token(model) -> float:
    embedding = model.get_input_embeddings().weight.numel()
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    return 6 * (non_embedding + model.config.vocab_size * model.config.hidden_size)


def sync() -> None:
    torch.cuda.synchronize()


def harness_rates(model, examples, steps, arms: dict[str, tuple[str, Split]], chunk, compiled: bool | str, rounds: int,
                  layout: dict):
    """tokens/s of each arm (a reduction mode and a semantic split) per round; each round trains
    every arm on the same steps, in a rotated order, so that arms compare paired."""
    device = torch.device("cuda")
    step_model = CausalLMLoss(model, chunk)
    if compiled:
        torch._dynamo.reset()  # a new row length gets its own static graph, not a dynamic-shape one
        step_model.compile_model(compiled)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def train(arm, step_ids) -> float:
        mode, split = arms[arm]

        def plan(k):
            return plan_step(examples, step_ids[k], mode=mode, loss_scale=1e-3, split=split, world=World(),
                             layout=layout).pin()
        sync()
        tic = time.perf_counter()
        # Uncompiled runs stay eager even when an earlier run compiled the model in place.
        with nullcontext() if compiled else torch.compiler.set_stance("force_eager"):
            for _, p in ahead(plan, range(len(step_ids)), background=True):
                run_step(step_model, optimizer, None, p, max_grad_norm=1.0, world=World(), device=device,
                         autocast_dtype=torch.bfloat16)
        sync()
        return sum(examples[i].seq_len for s in step_ids for i in s) / (time.perf_counter() - tic)

    per_round = len(steps) // (rounds + 1)
    tic = time.perf_counter()
    names = list(arms)
    train(names[0], steps[:per_round])  # warm-up and compilation
    print(f"    ({'compiling and ' if compiled else ''}warming up: {time.perf_counter() - tic:.0f} s)", flush=True)
    torch.cuda.reset_peak_memory_stats()
    rates = {a: [] for a in names}
    for r in range(rounds):
        same = steps[(r + 1) * per_round : (r + 2) * per_round]
        for arm in names[r % len(names):] + names[: r % len(names)]:
            rates[arm].append(train(arm, same))
    return rates, torch.cuda.max_memory_allocated() / 2**30


def paired(rates: dict, arm: str, base: str) -> str:
    ratios = [a / b for a, b in zip(rates[arm], rates[base])]
    return f"{statistics.median(ratios):.3f} (paired median of {len(ratios)} rounds; worst {min(ratios):.3f})"


def profile_steps(model, examples, step_ids, split: Split, chunk, layout: dict, top: int = 25) -> None:
    """The GPU kernels of a few (already compiled) harness steps, by total time."""
    from torch.profiler import ProfilerActivity, profile
    step_model = CausalLMLoss(model, chunk)
    step_model.compile_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    plans = [plan_step(examples, ids, mode="mean", loss_scale=1e-3, split=split, world=World(), layout=layout).pin()
             for ids in step_ids]
    run = lambda p: run_step(step_model, optimizer, None, p, max_grad_norm=1.0, world=World(),  # noqa: E731
                             device=torch.device("cuda"), autocast_dtype=torch.bfloat16)
    run(plans[0])
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for p in plans[1:]:
            run(p)
        sync()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70))


def trainer_rate(model_fn, examples, steps, batch, accum, flatten: bool, liger: bool = False) -> tuple[float, float]:
    from torch.utils.data import SequentialSampler
    from transformers import (DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainerCallback,
                              TrainingArguments)

    from harness.model.chat_tokenizer import build_char_tokenizer
    order = [examples[i] for s in steps for i in s]
    rows = [{"input_ids": e.input_ids, "labels": [IGNORE] + e.targets[:-1]} for e in order]
    torch.manual_seed(0)
    model = model_fn()
    if flatten:
        # FlexAttention keeps each sequence to itself (sdpa in transformers 5.24 attends across the
        # flattened row: checked on CPU), but transformers compiles its kernel again for every
        # new row length; on an H200 these 19 steps did not finish within 230 s.
        model.config._attn_implementation = "flex_attention"
        collator = DataCollatorWithFlattening()
    else:
        collator = DataCollatorForSeq2Seq(build_char_tokenizer(), padding=True, label_pad_token_id=IGNORE)
    warm = 3
    tokens_after_warm = sum(e.seq_len for e in order[warm * batch :])

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warm:
                sync()
                self.tic = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            sync()
            self.toc = time.perf_counter()

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    clock = Clock()
    args = TrainingArguments(output_dir="/tmp/trainer_bench", per_device_train_batch_size=batch // accum,
                             gradient_accumulation_steps=accum, max_steps=len(steps), bf16=True,
                             optim="adamw_torch_fused", learning_rate=1e-5, logging_steps=10_000, save_strategy="no",
                             report_to=[], dataloader_num_workers=2, remove_unused_columns=False,
                             max_grad_norm=1.0, disable_tqdm=True, use_liger_kernel=liger)
    torch.cuda.reset_peak_memory_stats()
    InOrder(model=model.cuda(), args=args, train_dataset=rows, data_collator=collator, callbacks=[clock]).train()
    return tokens_after_warm / (clock.toc - clock.tic), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="qwen0.5b")
    p.add_argument("--data", choices=["embedded", "long"], default="embedded")
    p.add_argument("--batch-size", type=int, default=128, help="sequences per optimizer step")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--tokens-per-micro-batch", default="20480",
                   help="packed row length; a comma-separated list also times the others (mean only), side by "
                        "side (the embedded data's 128-sequence steps fill one 20,480-token row to 89%%, two 10,240-token rows to 90%%)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per mode per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip", default="", help="comma-separated: harness,plain,trainer-pad,trainer-liger,trainer-flat,"
                                              "literal (the regime's literal run)")
    p.add_argument("--regime", action="store_true", help="also: 1 sequence per micro-batch, literal vs physical")
    p.add_argument("--no-compile", action="store_true", help="the harness's fast settings without torch.compile")
    p.add_argument("--compile-scope", choices=["layers", "model"], default="layers",
                   help="compile each decoder layer (the harness's default) or the whole model (trainer.compile_scope)")
    p.add_argument("--profile", action="store_true", help="print the GPU kernels that take the harness's time")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    row_lengths = [int(x) for x in args.tokens_per_micro_batch.split(",")]
    started = time.perf_counter()

    torch.manual_seed(0)
    model = MODELS[args.model]().cuda()
    vocab, fpt = model.config.vocab_size, flops_per_token(model)
    examples = embedded_examples(8192, vocab) if args.data == "embedded" else long_examples(4096, vocab)
    steps = training_order(len(examples), args.batch_size, args.steps * (args.rounds + 1), seed=0)
    max_len = max(e.seq_len for e in examples)
    tokens = max(row_lengths[0], max_len)
    chunk = max(256, (2**28 // vocab) // 256 * 256)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; model {args.model}: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, vocabulary {vocab}; data {args.data}: "
          f"mean {statistics.mean(e.seq_len for e in examples):.0f} tokens/example, max {max_len}; "
          f"batch {args.batch_size} x accumulation {args.grad_accum}")
    print(f"MFU = 6 x {fpt / 6 / 1e6:.0f}M x tokens/s / 989e12")
    results = []

    def report(name, rate, memory, note=""):
        results.append((name, rate, rate * fpt / PEAK_FLOPS, memory, note))
        print(f"  {name}: {rate:,.0f} tokens/s, MFU {rate * fpt / PEAK_FLOPS:.3f}, peak {memory:.1f} GiB {note} "
              f"[{time.perf_counter() - started:.0f} s]", flush=True)

    model.config._attn_implementation = "flex_attention"
    split = Split(args.grad_accum, None, tokens)
    compiled = False if args.no_compile else args.compile_scope  # torch.compile's scope, or eager
    mean_rate = None
    if "harness" not in skip:
        rates, memory = harness_rates(model, examples, steps, {m: (m, split) for m in MODES}, chunk, compiled,
                                      args.rounds, dict(pad_id=0, packing=True, row_length=tokens))
        if args.profile:
            profile_steps(model, examples, steps[:4], split, chunk, dict(pad_id=0, packing=True, row_length=tokens))
        mean_rate = statistics.median(rates["mean"])
        report(f"harness ({tokens}-token packed rows, {'compiled, ' if compiled else ''}chunked loss)", mean_rate, memory,
               "[mean]")
        for mode in MODES[1:]:
            print(f"    {mode:<10} vs mean: {paired(rates, mode, 'mean')}")

    n_trainer = 3 + 2 * args.steps
    def trainer_row(name: str, flatten: bool, liger: bool = False) -> None:
        if name in skip:
            return
        if liger and importlib.util.find_spec("liger_kernel") is None:
            print(f"  {name}: skipped: liger-kernel is not installed (pip install liger-kernel==0.8.5)")
            return
        try:
            rate, memory = trainer_rate(MODELS[args.model], examples, steps[:n_trainer], args.batch_size,
                                        args.grad_accum, flatten, liger)
            what = "DataCollatorWithFlattening + FlexAttention" if flatten else "padded, use_liger_kernel=True" \
                if liger else "padded"
            report(f"HF Trainer ({what})", rate, memory, f"harness is {mean_rate / rate:.2f}x" if mean_rate else "")
        except Exception as e:  # report and go on: the other figures still stand
            print(f"  {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")

    trainer_row("trainer-pad", False)
    trainer_row("trainer-flat", True)

    for length in (max(n, max_len) for n in row_lengths[1:]):
        rows = dict(pad_id=0, packing=True, row_length=length)
        other, memory = harness_rates(model, examples, steps[: 3 * args.steps],
                                      {"mean": ("mean", Split(args.grad_accum, None, length))}, chunk, compiled, 2, rows)
        report(f"harness, {length}-token rows", statistics.median(other["mean"]), memory, "[mean]")
    if "plain" not in skip:  # peak memory at the same (padded) micro-batches, plain loss vs chunked
        per_mb = args.batch_size // args.grad_accum

        def padded(what: str, loss_chunk):
            """(tokens/s, peak GiB) at the semantic micro-batches run padded; None if they do not fit."""
            try:
                rates, memory = harness_rates(model, examples, steps[: 3 * args.steps],
                                              {"mean": ("mean", Split(args.grad_accum))}, loss_chunk, False, 2,
                                              dict(pad_id=0, packing=False, row_length=max_len))
                return statistics.median(rates["mean"]), memory
            except torch.OutOfMemoryError as e:  # the plain path's full logits may not fit: say so and go on
                print(f"  {what}: out of memory at {per_mb} sequences per micro-batch ({str(e).splitlines()[0][:120]})")
                return None
            finally:
                torch.cuda.empty_cache()

        model.config._attn_implementation = "sdpa"
        plain = padded("plain", None)
        if plain:
            report(f"harness-plain ({per_mb}-sequence padded micro-batches, full logits, eager)", *plain)
        chunked = padded("chunked", chunk)
        model.config._attn_implementation = "flex_attention"
        if chunked:
            report(f"harness ({per_mb}-sequence padded micro-batches, chunked loss, eager)", *chunked,
                   f"(peak memory {plain[1] / chunked[1]:.1f}x lower than plain)" if plain else "")
    if args.regime:
        # Every mode at the semantic split of one sequence per micro-batch, and `mean` with the same
        # 64 sequences as one semantic micro-batch, all in the same packed rows: one compile, paired.
        print("regime: batch 64 x accumulation 64 (1 sequence per micro-batch), run in packed rows")
        steps64 = training_order(len(examples), 64, 6 * (args.rounds + 1), seed=1)
        model.config._attn_implementation = "flex_attention"
        rows = dict(pad_id=0, packing=True, row_length=tokens)
        arms = {f"{m} 64x64": (m, Split(64, None, tokens)) for m in MODES} | {"mean 64x1": ("mean", Split(1, None, tokens))}
        rates, memory = harness_rates(model, examples, steps64, arms, chunk, compiled, args.rounds, rows)
        report("harness, semantic 64x64 in packed rows", statistics.median(rates["mean 64x64"]), memory, "[mean]")
        print(f"  semantic 64x64 vs the same rows as one semantic micro-batch (64x1), mean: "
              f"{paired(rates, 'mean 64x64', 'mean 64x1')}")
        for mode in MODES[1:]:
            print(f"    {mode:<10} 64x64 vs mean 64x64: {paired(rates, f'{mode} 64x64', 'mean 64x64')}")
        if "literal" not in skip:  # eager and padded, so sdpa: FlexAttention uncompiled materialises the scores
            model.config._attn_implementation = "sdpa"
            literal, _ = harness_rates(model, examples, steps64[:9], {"mean": ("mean", Split(64))}, chunk, False, 2,
                                       dict(pad_id=0, packing=False, row_length=max_len))
            model.config._attn_implementation = "flex_attention"
            lit = statistics.median(literal["mean"])
            print(f"  the 64 micro-batches run literally (eager, one sequence each): {lit:,.0f} tokens/s "
                  f"({lit / statistics.median(rates['mean 64x64']):.3f} of packed)", flush=True)

    # Last: Liger patches transformers' modules (RoPE for the whole model class), which would change
    # every row after it.
    trainer_row("trainer-liger", False, liger=True)

    print("\nsummary")
    for name, rate, mfu, memory, note in results:
        print(f"  {name:<70}{rate:>12,.0f} tok/s  MFU {mfu:.3f}  peak {memory:5.1f} GiB  {note}")


if __name__ == "__main__":
    main()
