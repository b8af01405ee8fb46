#!/usr/bin/env bash
# The tuned ShareGPT studies (experiments/study_smollm2.yaml, study_gemma3.yaml and their _packed
# controls; docs/study-gemma3.md) on a GPU machine that reaches no package index and takes at most
# 64 MiB per call. The GGUF (SmolLM2: 98 MB; Gemma 3: 253 MB) goes over in pieces of at most
# PIECE_MIB (default 56) MiB, one piece per call, in calls made back to back on one warm machine (it
# keeps /tmp between calls); the data goes as the part of the ShareGPT file the studies use
# (benchmarks/sharegpt_subset.py), gzipped; every piece and file is checked against its SHA-256.
#
# Here, once per model (needs pip install -e ".[real]" and the model's package):
#   bash benchmarks/study_gpu.sh pack smollm2|gemma3
#     -> .whl/ (the project's dependencies the image lacks, plus gguf and Hydra's joblib launcher), .study_gpu/<model>/call1 (the
#        ShareGPT subset, the checksums and, for gemma3, the Gemma Terms of Use), call2 ... callN (the
#        GGUF's pieces); it prints what each call carries
# Then on the device, back to back, each call carrying what it names (a call may run other work
# after receiving: `receive && ...`):
#   bash benchmarks/study_gpu.sh receive                    carry [".whl", ".study_gpu/<model>/call1"]
#   bash benchmarks/study_gpu.sh receive                    carry [".study_gpu/<model>/call2"]  ... to callN
#   bash benchmarks/study_gpu.sh run PRESET [overrides]     (PRESET: study_smollm2, study_smollm2_packed,
#                                                            study_gemma3, study_gemma3_packed, sharegpt_smollm2)
#   bash benchmarks/study_gpu.sh speed PRESET [overrides]   (after call1 alone: no GGUF needed)
# `run` joins and checks the GGUF, installs the wheels, converts the model and tokenises the data (once
# per machine), then runs `python -m harness -m +experiment=PRESET [overrides]` in
# /tmp/study_gpu/work/PRESET for at most STUDY_BUDGET_S seconds (default 480; a job still training
# then is stopped by SIGTERM, checkpointed, and continues on the next `run` on the same machine). It
# leaves under $OUT the sweep's MLflow store (mlflow.db and mlartifacts/) as PRESET_store.tar.gz, the
# log and the per-run summary (wall time, tokens/s, final losses). A store carried back as
# .study_gpu/store/PRESET_store.tar.gz is restored first when the machine has none, so the same
# command continues a sweep on a fresh machine: finished jobs are skipped.
# `speed` measures the preset's workload (docs/performance.md) on the model's architecture with
# random weights (its config and tokenizer travel in call1; speed does not depend on the weights),
# each figure by benchmarks/cli_throughput.py from the runs' own time/* metrics: the published
# settings (16,384-token rows, compile off, sdpa; 24 steps) beside the preset's own (auto rows,
# compiled per layer, FlexAttention; 150 steps, 6 evaluations, two jobs: the first compiles, the
# second loads the cache), then 1, 2 and 4 jobs sharing the GPU (hydra/launcher=gpus
# trainer.jobs_per_gpu=N, N jobs of 40 steps). `mfu` (not in the default list) times the Qwen2.5-0.5B
# shape on the embedded data through `python -m harness` in every mode (128 x 2, auto rows) beside
# HF Trainer + Liger (benchmarks/gpu_throughput.py's trainer-liger row; Liger's wheel is in .whl/).
# Logs under $OUT. SPEED_PARTS picks some of `published preset shared mfu` (they take more than one
# 10-minute call: SPEED_PARTS="published preset" in one, "shared mfu" in the next, on the same warm
# machine: the compile cache stays).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
packs="$repo/.study_gpu"
store=/tmp/study_gpu
DATA_NAME=sharegpt_subset.json
PIECE_MIB=${PIECE_MIB:-56}
TIMEFORMAT='wall %R s'

gguf_name() {  # model -> the GGUF's file name
  case "$1" in smollm2) echo SmolLM2-135M-Instruct.Q4_1.gguf ;; gemma3) echo gemma-3-270m-q4_k_m.gguf ;;
    *) echo "error: unknown model '$1' (smollm2 or gemma3)" >&2; return 1 ;; esac
}

case "${1:-}" in
pack)
  set -e
  model=${2:-}; name=$(gguf_name "$model")
  cd "$repo"
  out="$packs/$model"
  rm -rf "$out" && mkdir -p "$out/call1"
  python3 - "$model" "$out/call1" <<'PY'
import shutil, sys
from harness.model import gguf_convert
model, dest = sys.argv[1], sys.argv[2]
print(gguf_convert.packaged_gguf(model), file=open(f"{dest}/../gguf_path", "w"))
for notice in gguf_convert.license_files(model):  # the Gemma Terms of Use travel with Gemma's weights
    shutil.copy(notice, dest)
folder = gguf_convert.converted_folder(gguf_convert.packaged_gguf(model), "~/.cache/reduce-loss-harness")
arch = f"{dest}/{model}_arch"  # the architecture and tokenizer, without the weights, for `speed`
shutil.copytree(folder, arch, ignore=shutil.ignore_patterns("*.safetensors"))
PY
  tar -czf "$out/call1/${model}_arch.tar.gz" -C "$out/call1" "${model}_arch" && rm -r "$out/call1/${model}_arch"
  gguf=$(cat "$out/gguf_path") && rm "$out/gguf_path"
  work=$(mktemp -d)
  (cd "$work" && split -b "${PIECE_MIB}M" -d -a 2 "$gguf" "$name.piece")
  n=1
  for piece in "$work/$name".piece*; do n=$((n + 1)); mkdir -p "$out/call$n"; mv "$piece" "$out/call$n/"; done
  rmdir "$work"
  python3 "$repo/benchmarks/sharegpt_subset.py" "$out/$DATA_NAME" +experiment=study_smollm2
  gzip -9 -n -c "$out/$DATA_NAME" > "$out/call1/$DATA_NAME.gz" && rm "$out/$DATA_NAME"
  (cd "$(dirname "$gguf")" && sha256sum "$name") > "$out/call1/SHA256SUMS"
  (cd "$out" && for f in call*/*; do [ "$(basename "$f")" = SHA256SUMS ] || sha256sum "$f" | sed "s| call[0-9]*/| |"; done) \
    >> "$out/call1/SHA256SUMS"
  wheelhouse=${WHEELHOUSE:-$repo/../shared/gpu/wheelhouse.sh}
  if [ -d .whl ] && ls .whl/mlflow-*.whl .whl/gguf-*.whl .whl/hydra_joblib_launcher-*.whl .whl/liger_kernel-*.whl >/dev/null 2>&1; then
    echo ".whl/ is there already"
  elif [ -x "$wheelhouse" ]; then
    mapfile -t deps < <(python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))")
    # the launcher: hydra/launcher=gpus; Liger (it needs torch: no dependencies): the `mfu` part's HF Trainer row
    NODEPS=liger-kernel "$wheelhouse" "${deps[@]}" 'gguf>=0.10' 'hydra-joblib-launcher>=1.2' 'liger-kernel==0.8.5'
  else
    echo "no wheelhouse script at $wheelhouse: build .whl/ with the project's dependencies and gguf yourself"
  fi
  tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
  for call in "$out"/call*; do
    extra=(); [ "$(basename "$call")" = call1 ] && [ -d .whl ] && extra=(.whl)
    bytes=$(du -cb "$call" "${extra[@]}" | tail -n 1 | cut -f1)
    echo "$(basename "$call") carries ${extra[*]:+${extra[*]} and }.study_gpu/$model/$(basename "$call"): $((bytes + tree)) bytes with the working tree (limit 67108864)"
  done
  exit 0 ;;
receive|run|speed) ;;
*) sed -n '2,38p' "$0"; exit 2 ;;
esac

# On the device from here on.
cmd=$1; shift
mkdir -p "$store"
sums() { awk -v f="$1" '$2 == f' "$store/SHA256SUMS" 2>/dev/null; }  # the checksum line of file $1
for f in "$packs"/*/call*/SHA256SUMS; do  # the checksums first, then the files they check
  [ -f "$f" ] && { [ -f "$store/SHA256SUMS" ] && cat "$store/SHA256SUMS"; cat "$f"; } | sort -u -k2,2 > "$store/SHA256SUMS.new" &&
    mv "$store/SHA256SUMS.new" "$store/SHA256SUMS"
done
for f in "$packs"/*/call*/*; do
  base=$(basename "$f")
  [ -f "$f" ] && [ "$base" != SHA256SUMS ] || continue
  cp -f "$f" "$store/"
  if [ -n "$(sums "$base")" ]; then
    (cd "$store" && sums "$base" | sha256sum -c --quiet -) ||
      { rm -f "$store/$base"; echo "error: $base arrived damaged (it fails its SHA-256): carry it again"; exit 1; }
  fi
done
echo "received so far: $(cd "$store" && ls | tr '\n' ' ')"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="/tmp/site:$repo"
if [ -d "$repo/.whl" ] && ls "$repo"/.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$repo"/.whl/*.whl || exit 1
fi
[ "$cmd" = receive ] && exit 0

preset=${1:-}; shift || true
case "$preset" in study_smollm2|study_smollm2_packed|sharegpt_smollm2) model=smollm2 ;;
  study_gemma3|study_gemma3_packed) model=gemma3 ;;
  *) echo "error: $cmd needs a preset: study_smollm2, study_smollm2_packed, study_gemma3, study_gemma3_packed or sharegpt_smollm2"
     exit 2 ;; esac
name=$(gguf_name "$model")
out=${OUT:-$store/out}; mkdir -p "$out"
if [ "$cmd" = speed ]; then
  [ -f "$store/$DATA_NAME" ] || gunzip -k "$store/$DATA_NAME.gz" || exit 1
  [ -d "$store/${model}_arch" ] || tar -xzf "$store/${model}_arch.tar.gz" -C "$store" || exit 1
  nvidia-smi -L
  work="$store/speed/$preset"; rm -rf "$work"; mkdir -p "$work"
  args=("+experiment=$preset" model=hf "model.name_or_path=$store/${model}_arch" model.init=random
        "data.path=$store/$DATA_NAME" "data.cache_dir=$store/cache" "trainer.compile_cache_dir=$store/compile_cache" "$@")
  measure() {  # label, seconds, overrides...
    local label=$1 limit=$2; shift 2
    echo "== $label"
    timeout --signal=TERM --kill-after=30 "$limit" python3 "$repo/benchmarks/cli_throughput.py" --dir "$work/$label" \
      "${args[@]}" "$@" > "$out/speed_$label.log" 2>&1
    tr '\r' '\n' < "$out/speed_$label.log" | grep -v '%|' | sed -n '/ jobs in /,$p'
  }
  parts=" ${SPEED_PARTS:-published preset shared} "  # a call runs at most 10 minutes: two calls, split here
  [[ $parts == *" published "* ]] && measure published "${SPEED_PUBLISHED_S:-120}" model.attn_implementation=sdpa \
    trainer.tokens_per_micro_batch=16384 trainer.compile=false trainer.max_steps=24 trainer.eval_every=12 reduce_loss=mean seed=0
  [[ $parts == *" preset "* ]] && measure preset "${SPEED_PRESET_S:-420}" trainer.max_steps=150 trainer.eval_every=25 \
    reduce_loss=mean,sum seed=0
  [[ $parts == *" shared "* ]] && for n in ${SPEED_JOBS_PER_GPU:-1 2 4}; do
    measure "jobs_per_gpu_$n" "${SPEED_SHARED_S:-120}" hydra/launcher=gpus "trainer.jobs_per_gpu=$n" trainer.max_steps=40 \
      trainer.eval_every=40 reduce_loss=mean "seed=$(seq -s, 0 $((n - 1)))"
  done
  if [[ $parts == *" mfu "* ]]; then
    python3 "$repo/benchmarks/cli_throughput.py" --write-model "qwen0.5b:$store/qwen0.5b" > /dev/null
    args=(model=hf "model.name_or_path=$store/qwen0.5b" model.init=random data.num_train=8192 trainer.batch_size=128
          trainer.grad_accum=2 trainer.tokens_per_micro_batch=auto "trainer.compile_cache_dir=$store/compile_cache")
    measure mfu_cli "${SPEED_MFU_S:-300}" trainer.max_steps=60 trainer.eval_every=60 reduce_loss=mean,sum,token_mean,seq_mean
    echo "== mfu_trainer_liger"
    timeout --signal=TERM --kill-after=30 "${SPEED_LIGER_S:-180}" python3 "$repo/benchmarks/gpu_throughput.py" --model qwen0.5b \
      --data embedded --rounds 1 --skip harness,plain,trainer-pad,trainer-flat > "$out/speed_mfu_trainer_liger.log" 2>&1
    sed -n '/^summary/,$p' "$out/speed_mfu_trainer_liger.log"
  fi
  exit 0
fi
if [ ! -f "$store/$name" ]; then
  pieces=$(awk -v f="$name.piece" 'index($2, f) == 1' "$store/SHA256SUMS" 2>/dev/null | wc -l)
  [ "$pieces" -gt 0 ] || { echo "error: $name's checksums never arrived: carry .study_gpu/$model/call1 first"; exit 1; }
  for i in $(seq 0 $((pieces - 1))); do
    p=$(printf '%s.piece%02d' "$name" "$i")
    [ -f "$store/$p" ] || { echo "error: $p never arrived: make the receive calls back to back on one warm machine"; exit 1; }
  done
  cat "$store/$name".piece* > "$store/$name.joining" && mv "$store/$name.joining" "$store/$name" && rm -f "$store/$name".piece*
fi
[ -n "$(sums "$name")" ] && (cd "$store" && sums "$name" | sha256sum -c --quiet -) ||
  { rm -f "$store/$name"; echo "error: the joined $name fails its SHA-256: carry its pieces again"; exit 1; }
[ -f "$store/$DATA_NAME" ] || gunzip -k "$store/$DATA_NAME.gz" || exit 1
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

work="$store/work/$preset"; mkdir -p "$work"; cd "$work"
carried="$packs/store/${preset}_store.tar.gz"
if [ ! -f mlflow.db ] && [ -f "$carried" ]; then
  echo "== restoring the store of earlier runs from $carried"
  tar -xzf "$carried" -C "$work" || exit 1
fi
args=(-m "+experiment=$preset" "model.gguf_file=$store/$name" "data.path=$store/$DATA_NAME"
      "model.cache_dir=$store/cache" "data.cache_dir=$store/cache" "$@")
echo "== converting the GGUF and tokenising the data (once per machine)"
time (python3 -c 'import sys; from harness.launch.preflight import main_or_exit; main_or_exit(sys.argv[1:])' \
        "${args[@]}" > "$work/prepare.log" 2>&1) || { tail -n 5 "$work/prepare.log"; exit 1; }
echo "== python -m harness ${args[*]} (at most ${STUDY_BUDGET_S:-480} s)"
time (timeout --signal=TERM --kill-after=60 "${STUDY_BUDGET_S:-480}" python3 -m harness "${args[@]}" >> "$work/sweep.log" 2>&1)
status=$?
[ "$status" = 124 ] && echo "== stopped at the time budget: the same command continues the sweep"
tail -n 3 "$work/sweep.log"
python3 "$repo/benchmarks/run_summary.py" sqlite:///mlflow.db > "$out/${preset}_runs.txt" 2>&1
cat "$out/${preset}_runs.txt"
tar -czf "$out/${preset}_store.tar.gz" mlflow.db mlartifacts 2>/dev/null || tar -czf "$out/${preset}_store.tar.gz" mlflow.db
tr '\r' '\n' < "$work/sweep.log" | grep -v '%|' | tail -n 400 > "$out/${preset}_sweep.log"
ls -la "$out"
exit "$status"
