"""Training tokens/s of every reduction mode on the same model and data, side by side.

    python benchmarks/reduction_throughput.py                 # ~100M model on CUDA (if present)
    python benchmarks/reduction_throughput.py --small         # the embedded tiny model, for a CPU

Modes run in interleaved rounds (order rotated each round) so drifting clocks hit all alike.
Every mode trains on the same steps within a round, but rounds differ in data (and so in
padding), so each mode's ratio to `mean` is taken within a round and the median over rounds is
reported beside the median tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from harness.config import CONF_DIR
from harness.data.data_order import training_order
from harness.distributed import World
from harness.model.loading import build_model, load_tokenizer
from harness.training.reduction import MODES
from harness.training.step import train_step
from harness.data.tokenise import prepare_data

GPU_MODEL = dict(hidden_size=768, intermediate_size=2048, num_layers=16, num_heads=12, num_kv_heads=4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="the default tiny model instead of ~100M parameters")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per mode per round")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--packing", action="store_true")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = OmegaConf.load(CONF_DIR / "model" / "tiny_llama.yaml")
    if not args.small:
        model_cfg = OmegaConf.merge(model_cfg, GPU_MODEL)
    data_cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "data" / "synthetic.yaml"), {"num_train": 4096, "num_val": 8})
    tokenizer = load_tokenizer(model_cfg)
    data = prepare_data(data_cfg, tokenizer)
    model = build_model(model_cfg, tokenizer, seed=0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = device.type == "cuda"
    steps = training_order(len(data.train), args.batch_size, args.steps * (args.rounds + 1), seed=0)
    layout = dict(pad_id=tokenizer.pad_token_id, packing=args.packing, row_length=data_cfg.max_seq_len)

    def run(mode: str, step_ids: list[list[int]]) -> float:
        """tokens/s over `step_ids`, each a full optimizer step."""
        tokens = 0
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        for ids in step_ids:
            record = train_step(model, optimizer, None, data.train, ids, mode=mode, loss_scale=1.0,
                                max_grad_norm=1.0, grad_accum=args.grad_accum, world=World(), layout=layout,
                                device=device, autocast_dtype=torch.bfloat16 if autocast else None)
            tokens += record.tokens
        if device.type == "cuda":
            torch.cuda.synchronize()
        return tokens / (time.perf_counter() - tic)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"model {n_params / 1e6:.1f}M parameters, batch {args.batch_size} x accumulation {args.grad_accum}, "
          f"packing {args.packing}")
    cursor = iter(steps)
    run("mean", [next(cursor) for _ in range(args.steps)])  # warm-up
    results: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        same_steps = [next(cursor) for _ in range(args.steps)]  # every mode trains on the same steps
        order = MODES[r % len(MODES):] + MODES[: r % len(MODES)]
        for mode in order:
            results[mode].append(run(mode, same_steps))
    print(f"{'mode':<12}{'tokens/s (median)':>20}{'min':>14}{'max':>14}{'vs mean (paired median)':>26}{'worst round':>13}")
    for mode in MODES:
        ratios = [a / b for a, b in zip(results[mode], results["mean"])]
        print(f"{mode:<12}{statistics.median(results[mode]):>20,.0f}{min(results[mode]):>14,.0f}"
              f"{max(results[mode]):>14,.0f}{statistics.median(ratios):>26.3f}{min(ratios):>13.3f}")


if __name__ == "__main__":
    main()
