#!/usr/bin/env bash
# The checks that need GPUs, in one go, logs into the folder given (default ./gpu_checks):
# GPU tests, the throughput benchmark, 2-GPU DDP vs 1 GPU with twice the accumulation (token_mean), the gpu_100m study,
# and the default sweep. Needs 2 GPUs for the DDP part.
set -uo pipefail
out=$(realpath -m "${1:-gpu_checks}"); mkdir -p "$out"
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
TIMEFORMAT='wall %R s'
nvidia-smi -L
python3 -m pytest -q -p no:cacheprovider "$repo/tests/harness/test_gpu.py" 2>&1 | tail -3
echo "== throughput: harness vs HF Trainer"
python3 "$repo/benchmarks/gpu_throughput.py" --model qwen0.5b --data embedded > "$out/throughput.log" 2>&1
sed -n '/^summary/,$p' "$out/throughput.log"

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
