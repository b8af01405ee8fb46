"""What a cold compile costs, per layer (trainer.compile_scope=layers) and for the whole model
(compile_scope=model): the first and second training step of one packed row, each scope in a
fresh process with an empty Inductor cache.

    python benchmarks/compile_time.py [--model smollm135m] [--tokens 256] [--device cpu|cuda]

The model is one of benchmarks/gpu_throughput.py's shapes, random init, with the harness's
model-and-loss module (harness/training/losses.py) and its chunked loss; FlexAttention on CUDA,
sdpa on CPU. Prints each scope's first step (the compile), second step and Dynamo's graphs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_throughput's model shapes


def one_scope(model_name: str, tokens: int, device: str, scope: str) -> dict:
    import torch
    from torch._dynamo.utils import counters

    from gpu_throughput import MODELS
    from harness.training.losses import CausalLMLoss
    torch.manual_seed(0)
    model = MODELS[model_name]().to(device)
    model.config._attn_implementation = "flex_attention" if device == "cuda" else "sdpa"
    loss_model = CausalLMLoss(model, chunk_tokens=4096)
    loss_model.compile_model(scope)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    positions = torch.cat([torch.arange(tokens // 2), torch.arange(tokens - tokens // 2)]).view(1, -1).to(device)
    weights = torch.full((1, tokens), 1.0 / tokens, device=device)
    times = []
    for _ in range(2):
        tic = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss, _ = loss_model(ids, positions, ids, weights, torch.arange(tokens, device=device))
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    return {"first_s": times[0], "second_s": times[1], "graphs": int(counters["stats"]["unique_graphs"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm135m")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    p.add_argument("--scope", help=argparse.SUPPRESS)  # internal: one scope, in this process
    args = p.parse_args()
    if args.scope:
        print(json.dumps(one_scope(args.model, args.tokens, args.device, args.scope)))
        return
    print(f"{args.model}, one {args.tokens}-token row on {args.device}, cold Inductor cache per scope")
    for scope in ("layers", "model"):
        with tempfile.TemporaryDirectory(prefix="compile_time-") as cache:
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens),
                                  "--device", args.device, "--scope", scope], capture_output=True, text=True,
                                 env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
        if out.returncode:
            sys.exit(f"error: scope {scope} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  compile_scope={scope:<7} first step {r['first_s']:7.1f} s   second {r['second_s']:6.2f} s   "
              f"{r['graphs']} Dynamo graphs")


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
