#!/usr/bin/env bash
# The checks that need GPUs, in one go, logs into the folder given (default ./gpu_checks):
# GPU tests, the throughput benchmark and its regime, 2-GPU DDP vs 1 GPU with twice the accumulation (token_mean), the gpu_100m study,
# and the default sweep. Needs 2 GPUs for the DDP part.
set -uo pipefail
out=$(realpath -m "${1:-gpu_checks}"); mkdir -p "$out"
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
TIMEFORMAT='wall %R s'
nvidia-smi -L
python3 -m pytest -q -p no:cacheprovider "$repo/tests/harness/training/test_gpu.py" 2>&1 | tail -3
echo "== throughput: harness vs HF Trainer (the padding-free Trainer row left out: it recompiles for every row length)"
python3 "$repo/benchmarks/gpu_throughput.py" --model qwen0.5b --data embedded --tokens-per-micro-batch 20480,10240 \
  --skip trainer-flat > "$out/throughput.log" 2>&1
sed -n '/^summary/,$p' "$out/throughput.log"
echo "== the one-sequence-per-micro-batch regime, SmolLM2 shape (a fresh machine compiles ~5 minutes first)"
python3 "$repo/benchmarks/gpu_throughput.py" --model smollm135m --data long --batch-size 64 --grad-accum 64 \
  --tokens-per-micro-batch 16384 --regime --skip harness,plain,trainer-pad,trainer-flat > "$out/regime.log" 2>&1
grep -A8 "^regime" "$out/regime.log"

work=$(mktemp -d); cd "$work"
echo "== token_mean: 2 GPUs x grad_accum 1 vs 1 GPU x grad_accum 2 (fp32: the two should agree closely)"
time (torchrun --nproc_per_node=2 -m harness reduce_loss=token_mean trainer.grad_accum=1 trainer.precision=fp32 tracking.uri=sqlite:///two.db > "$out/two_gpus.log" 2>&1)
time (python3 -m harness reduce_loss=token_mean trainer.grad_accum=2 trainer.precision=fp32 tracking.uri=sqlite:///one.db > "$out/one_gpu.log" 2>&1)
grep -h "training on" "$out/two_gpus.log" "$out/one_gpu.log"
python3 "$repo/benchmarks/compare_loss_curves.py" sqlite:///one.db sqlite:///two.db

echo "== +experiment=gpu_100m"
work=$(mktemp -d); cd "$work"
time (python3 -m harness -m +experiment=gpu_100m > "$out/gpu_100m.log" 2>&1)
python3 "$repo/benchmarks/run_summary.py" sqlite:///mlflow.db
cp multirun/*/*/analysis/report.md "$out/gpu_100m_report.md" 2>/dev/null

echo "== default sweep"
work=$(mktemp -d); cd "$work"
time (python3 -m harness -m reduce_loss=mean,sum > "$out/default_sweep.log" 2>&1)
python3 "$repo/benchmarks/run_summary.py" sqlite:///mlflow.db
