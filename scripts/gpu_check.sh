#!/usr/bin/env bash
# One GPU session's checks, about 8 minutes on an H100, writing raw results where benchmarks/report.py picks them up:
#   tests   the CUDA tests (tests/test_gpu.py: GPU training equals CPU training)
#   speed   the speed/memory bench at T = 8 against FusionBench (b/a, c/b, b-lean/c memory)
#   full    the `full` preset's own-head table, every standard row, pooler heads (docs/results.md)
#   early   the recommended recipe, 500 steps against early-stopped, on the same zoo
#   frozen  the `full` preset's frozen-head table (a second call's worth: not in the default list)
#   lora    the `quick` preset's LoRA table, every row (not in the default list either)
#
#   bash scripts/gpu_check.sh pack              # here, with the registries: .gpu/ (data, base, wheels, commit)
#   bash scripts/gpu_check.sh run [PHASE ...]   # on the GPU machine (default: tests speed full early); results in $OUT
#   bash scripts/gpu_check.sh store DIR         # here: each result of DIR into docs/results/, then the pages
#   bash scripts/gpu_check.sh dry-run           # here, on CPU: every phase at the `ci` preset's size
#
# The GPU machine has torch, transformers, peft and Lightning but no `datasets` and no network, and a call carries at
# most 64 MiB: the MiniLM base (87 MiB) travels in two halves. Call 1: carry .gpu/base.part-aa and .gpu/wheels, run
# `bash scripts/gpu_check.sh run tests speed` (the bench builds its own random model). Call 2, same warm machine:
# carry .gpu/base.part-ab, .gpu/base.sha256, .gpu/data, .gpu/commit, run `bash scripts/gpu_check.sh run full early`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ROWS="average task_arithmetic ties tsv_m iso_c adamerging_task adamerging_layer adamerging_pp_layer concrete_ta
concrete_adamerging tinting_tsv tinting wemoe surgery_ta surgery_adamerging surgery_tsv"
LORA_ROWS="task_arithmetic ties tsv_m iso_c adamerging_layer tinting tinting_tsv wemoe surgery_ta"

pack() {
  PY=${PYTHON:-.venv/bin/python}
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  mkdir -p .gpu/wheels
  git rev-parse --short=7 HEAD > .gpu/commit
  "$PY" - <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from benchmarks.run import PRESETS
from benchmarks.tasks import prepare
from benchmarks.zoo import build_base
p = PRESETS["full"]
prepare(p.tasks, Path(".gpu/data"), Path(".cache/wheels"), seed=0, max_train=p.max_train,
        max_unlabeled=p.max_unlabeled, max_test=p.max_test)
build_base(Path(".gpu/zoo"))
EOF
  (cd .gpu && split -n 2 zoo/base/model.safetensors base.part- && sha256sum zoo/base/model.safetensors > base.sha256)
  mkdir -p .gpu/data/base-files && cp .gpu/zoo/base/*.json .gpu/data/base-files/
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels "datasets==$("$PY" -c 'import datasets; print(datasets.__version__)')" dill multiprocess \
    fusion-bench==0.2.33 omegaconf antlr4-python3-runtime==4.9.3
  du -sh .gpu/* | sort -h
}

setup_device() {  # the carried pieces into place (each step only where its pieces came)
  if compgen -G ".gpu/wheels/*.whl" > /dev/null && [ ! -d /tmp/gpu-site ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-site .gpu/wheels/*.whl
  fi
  if [ -d /tmp/gpu-site ]; then export PYTHONPATH="/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}"; fi
  if [ -f .gpu/base.part-ab ] && [ ! -f .cache/zoo/base/model.safetensors ]; then
    mkdir -p .cache/zoo/base
    cat .gpu/base.part-aa .gpu/base.part-ab > .gpu/model.safetensors
    (cd .gpu && sed 's#zoo/base/model.safetensors#model.safetensors#' base.sha256 | sha256sum -c -)
    mv .gpu/model.safetensors .cache/zoo/base/ && cp .gpu/data/base-files/*.json .cache/zoo/base/
  fi
  if [ -d .gpu/data ] && [ ! -e .cache/data/quotes ]; then mkdir -p .cache && cp -r .gpu/data/. .cache/data/; fi
  if [ -f .gpu/commit ]; then export ADAMERGE_COMMIT="$(cat .gpu/commit)"; fi
}

run() {
  OUT=${OUT:-runs/gpu-check}
  mkdir -p "$OUT"
  PRESET=${GPU_CHECK_PRESET:-full}
  SPEED=${GPU_CHECK_SPEED:---tasks 8 --steps 10 --columns a b b-lean c --fusionbench-python $PY}
  EARLY_STEPS=${GPU_CHECK_EARLY_STEPS:-500}
  local phases=("$@")
  [ ${#phases[@]} -gt 0 ] || phases=(tests speed full early)
  setup_device
  export PYTHONUNBUFFERED=1
  for phase in "${phases[@]}"; do
    start=$(date +%s)
    case $phase in
      tests) "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/cuda-tests.log" ;;
      speed)
        # shellcheck disable=SC2086
        "$PY" benchmarks/bench_speed.py $SPEED 2>&1 | tail -40
        cp runs/bench_speed.json "$OUT/speed.json" ;;
      full|frozen)
        zoo=own; [ "$phase" = frozen ] && zoo=frozen
        # shellcheck disable=SC2086
        "$PY" benchmarks/benchmark.py --preset "$PRESET" --zoo $zoo --head-pooler --inductive-only --no-pairs \
          --fresh --out runs/gpu-check --methods $ROWS 2>&1 | grep -v -i warn | tail -40
        suffix=""; [ "$zoo" = frozen ] && suffix="-frozen-head"
        cp "runs/gpu-check/$PRESET$suffix-pooler/results.json" "$OUT/$PRESET-$zoo.json" ;;
      early)
        "$PY" benchmarks/benchmark.py --preset "$PRESET" --head-pooler --inductive-only --no-pairs --fresh \
          --steps "$EARLY_STEPS" --out runs/gpu-check-early --methods tinting_tsv tinting_tsv_early 2>&1 \
          | grep -v -i warn | tail -20
        cp "runs/gpu-check-early/$PRESET-pooler/results.json" "$OUT/early-$PRESET.json" ;;
      lora)
        lora_preset=quick  # the preset with a LoRA zoo (its section at CI size: tests/test_benchmark_ci.py)
        # shellcheck disable=SC2086
        "$PY" benchmarks/benchmark.py --preset $lora_preset --head-pooler --inductive-only --no-pairs --fresh \
          --out runs/gpu-check-lora --methods --lora-methods $LORA_ROWS 2>&1 | grep -v -i warn | tail -20
        cp "runs/gpu-check-lora/$lora_preset-pooler/results.json" "$OUT/lora.json" ;;
      *) echo "gpu_check: unknown phase $phase (tests, speed, full, early, frozen, lora)" >&2; exit 2 ;;
    esac
    echo "gpu_check: $phase took $(( $(date +%s) - start )) s"
  done
  ls -la "$OUT"
}

store() {
  local dir=$1 PY=${PYTHON:-.venv/bin/python} f name
  for f in "$dir"/*.json; do
    name=$(basename "$f" .json)
    case $name in
      speed) "$PY" benchmarks/report.py add "$f" --speed --name speed-h100 ;;
      full-own|full-frozen|early-full) "$PY" benchmarks/report.py add "$f" --name "$name" ;;
      lora) "$PY" benchmarks/report.py add "$f" --section lora --name lora ;;
      *) echo "gpu_check: $f: not a result this script stores" ;;
    esac
  done
  "$PY" benchmarks/report.py || true
  echo "gpu_check: a new table needs its block in docs/results.md (<!-- table NAME --> ... <!-- /table -->);"
  echo "then: python benchmarks/report.py && python -m pytest tests/test_results_page.py"
}

dry_run() {  # every phase on this machine at the ci preset's size, into a scratch folder
  local scratch
  scratch=$(mktemp -d)
  PYTHON=${PYTHON:-$PWD/.venv/bin/python} OUT="$scratch/out" GPU_CHECK_PRESET=ci GPU_CHECK_EARLY_STEPS=6 \
    GPU_CHECK_SPEED="--tasks 2 --steps 1 --rows 2 --length 8 --columns a b b-lean" \
    bash "$0" run tests speed full early
  ls "$scratch/out"
  for f in ci-own.json early-ci.json speed.json; do
    [ -s "$scratch/out/$f" ] || { echo "gpu_check dry-run: $f missing" >&2; exit 1; }
  done
  echo "gpu_check dry-run: every phase ran; results in $scratch/out"
}

case ${1:-} in
  pack) pack ;;
  run) shift; run "$@" ;;
  store) store "${2:?store DIR}" ;;
  dry-run) dry_run ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac
