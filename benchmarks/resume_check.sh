#!/usr/bin/env bash
# Interrupted and resumed runs against uninterrupted ones, on the GPU: one GPU killed with
# SIGKILL after a checkpoint, and two GPUs under DDP with SIGTERM sent to rank 0 only. Prints
# exit codes, run statuses and how far the final per-example validation losses are apart.
# Needs 2 GPUs for the DDP part (DEVICE=cpu runs both parts on the CPU, DDP over gloo).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
args=(trainer.max_steps=6 trainer.eval_every=3 trainer.batch_size=8 data.num_train=64 data.num_val=24
      trainer.checkpoint_every=2 "trainer.device=${DEVICE:-cuda}")
work=$(mktemp -d); cd "$work"; mkdir one one_stopped two two_stopped

cat > signal_at.py <<'EOF'
# python signal_at.py CALL SIGNAL RANK [harness overrides]: the harness, sending SIGNAL to itself
# (on RANK only) when run_step is called for the CALL-th time.
import os, signal, sys
import harness.training.loop as train
call, name, rank = int(sys.argv[1]), sys.argv[2], sys.argv[3]
real, calls = train.run_step, []
def run_step(*args, **kwargs):
    calls.append(1)
    if len(calls) == call and os.environ.get("RANK", "0") == rank:
        os.kill(os.getpid(), getattr(signal, name))
    return real(*args, **kwargs)
train.run_step = run_step
sys.argv = ["harness"] + sys.argv[4:]
from harness.__main__ import main
main()
EOF

cat > compare.py <<'EOF'
# python compare.py REFERENCE_DIR RESUMED_DIR: the single run of each store, side by side.
import sys, tempfile
import pandas as pd
from mlflow.tracking import MlflowClient
out = []
for folder in sys.argv[1:]:
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    print(f"{folder}: {len(runs)} run(s), status {[r.info.status for r in runs]}, "
          f"resumed_from_step {runs[0].data.tags.get('resumed_from_step')}, "
          f"train/loss steps {[m.step for m in client.get_metric_history(runs[0].info.run_id, 'train/loss')]}")
    path = client.download_artifacts(runs[0].info.run_id, "eval/final.parquet", tempfile.mkdtemp())
    out.append((pd.read_parquet(path), open(path, "rb").read()))
(a, a_bytes), (b, b_bytes) = out
print(f"final.parquet bitwise equal: {a_bytes == b_bytes}; largest |loss_sum difference|: "
      f"{(a.loss_sum - b.loss_sum).abs().max():.3g} nats (loss_sum up to {a.loss_sum.max():.1f})")
EOF

[ "${DEVICE:-cuda}" = cuda ] && nvidia-smi -L
echo "== 1 GPU: SIGKILL when step 6 starts (checkpoints after steps 2 and 4), then the same command"
(cd one && python3 -m harness "${args[@]}" > ../one.log 2>&1; echo "uninterrupted: exit $?")
(cd one_stopped && python3 ../signal_at.py 6 SIGKILL 0 "${args[@]}" > ../killed.log 2>&1; echo "killed: exit $?"
 ls checkpoints/*/; python3 -m harness "${args[@]}" > ../resumed.log 2>&1; echo "resumed: exit $?")
python3 compare.py one one_stopped

echo "== 2 GPUs (DDP): SIGTERM to rank 0 only when step 3 starts, then the same command"
(cd two && torchrun --nproc_per_node=2 -m harness "${args[@]}" > ../two.log 2>&1; echo "uninterrupted: exit $?")
(cd two_stopped && torchrun --nproc_per_node=2 ../signal_at.py 3 SIGTERM 0 "${args[@]}" > ../stopped.log 2>&1
 echo "stopped: exit $?"; grep -o "error: stopped.*" ../stopped.log; ls checkpoints/*/*/
 python3 -c "from mlflow.tracking import MlflowClient as C; c = C('sqlite:///mlflow.db')
print('after the stop:', [r.info.status for r in c.search_runs([e.experiment_id for e in c.search_experiments()])])"
 torchrun --nproc_per_node=2 -m harness "${args[@]}" > ../resumed2.log 2>&1; echo "resumed: exit $?")
python3 compare.py two two_stopped
