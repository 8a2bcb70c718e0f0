#!/usr/bin/env bash
# The project's GPU suite in one command, from a bare machine with the project installed (the offline
# GPU image's check script installs the wheels it lacks and the project, then calls this):
#
#     bash benchmarks/gpu_suite.sh OUTDIR
#
# Stages, each under its own `timeout` (a budget, capped by what is left of the total), each writing its log and
# JSON into OUTDIR; a stage that fails or runs out of time never stops the next one:
#   gpu_tests    SPO_FAST_TEST_GPU=1 pytest -m gpu tests/        -> gpu_tests.log, gpu_tests.xml
#   ops          op benchmarks, eager + Triton (no torch.compile)  -> ops.json
#   e2e_sd15     one SPO iteration at the SD1.5 recipe             -> e2e_sd15.json (pytest-benchmark), e2e.json
#   e2e_sdxl     one SPO iteration at the SDXL recipe              -> e2e_sdxl.json, e2e.json
#   e2e_dpo      one Diffusion-DPO optimizer step, SD1.5 and SDXL  -> e2e_dpo.json, e2e.json
#   estimate     the estimator on the same configs (fake tensors)   -> e2e.json: each case's "estimate", side by side
#   ablation     the speed options one at a time at SD1.5          -> e2e_ablation.json, e2e.json
#   ops_compile  op benchmarks' torch.compile provider             -> ops_compile.json
# then a short report (report.txt) and stages.tsv (stage, rc, seconds). e2e.json is the end-to-end summary
# (benchmarks/e2e.py: the stage split, MFU, projections, ablation), filled case by case.
#
# Time: SPO_GPU_SUITE_S (default 440 s) in all; the stages' budgets below add up to more, so the later stages (the
# ablation, the compile provider) get what the earlier ones leave: give a larger total to measure every ablation
# row. Without CUDA the same stages run the CPU cases (tiny models, a few minutes); the GPU tests skip there.
set -u
OUT=${1:-${OUT:-$PWD/gpu-out}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
TOTAL=${SPO_GPU_SUITE_S:-440}
SECONDS=0
export SPO_FAST_GIT_COMMIT=${SPO_FAST_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}
E2E_JSON="$OUT/e2e.json"
: > "$OUT/stages.tsv"

log() { printf '[gpu_suite %4ds] %s\n' "$SECONDS" "$*" | tee -a "$OUT/suite.log"; }

# stage NAME BUDGET_S CMD...: run CMD under timeout min(BUDGET_S, time left - 15 s), output to OUT/NAME.log
stage() {
  local name=$1 budget=$2
  shift 2
  local left=$((TOTAL - SECONDS - 15))
  if ((left < 20)); then
    log "$name: skipped (only $((TOTAL - SECONDS)) s of the $TOTAL s budget left)"
    printf '%s\tskipped\t0\n' "$name" >> "$OUT/stages.tsv"
    return
  fi
  ((budget > left)) && budget=$left
  log "$name: start (budget ${budget} s)"
  local t0=$SECONDS
  timeout -k 10 "$budget" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local why=""
  ((rc == 124 || rc == 137)) && why=" (time limit)"
  log "$name: rc=$rc$why in $((SECONDS - t0)) s; $(tail -n 1 "$OUT/$name.log")"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/stages.tsv"
}

CUDA=$($PY -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
# On a CPU shared with other jobs, OpenMP's spin-waiting made a tiny iteration 30x slower (measured on the 2-core
# machine: 27 s instead of 0.8 s); passive waiting costs nothing when the cores are free.
((CUDA)) || export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
$PY - > "$OUT/env.txt" 2>&1 <<'PY'
import torch
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f"unavailable ({e})"
import diffusers, transformers, peft, accelerate
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", tv, "diffusers", diffusers.__version__,
      "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)")
PY
log "$(tr '\n' ' ' < "$OUT/env.txt")"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  > "$OUT/nvidia-smi.txt" 2>&1

BENCH=(-m pytest -q -p no:cacheprovider -rs --benchmark-only)
OPS=(benchmarks/test_bench_spo_loss.py benchmarks/test_bench_ddim_step.py benchmarks/test_bench_pair_select.py)
E2E=benchmarks/test_bench_e2e.py

# tests/conftest.py turns on Triton's interpreter unless SPO_FAST_TEST_GPU=1: the GPU tests need the compiled kernels
stage gpu_tests 90 env SPO_FAST_TEST_GPU=1 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/ \
  --junitxml "$OUT/gpu_tests.xml"
stage ops 60 "$PY" "${BENCH[@]}" "${OPS[@]}" -k "not compile" --benchmark-max-time=0.25 \
  --benchmark-json "$OUT/ops.json"
stage e2e_sd15 90 "$PY" "${BENCH[@]}" "$E2E" -k "spo_iteration and sd15" --benchmark-json "$OUT/e2e_sd15.json" \
  --e2e-json "$E2E_JSON"
stage e2e_sdxl 75 "$PY" "${BENCH[@]}" "$E2E" -k "spo_iteration and sdxl" --benchmark-json "$OUT/e2e_sdxl.json" \
  --e2e-json "$E2E_JSON"
stage e2e_dpo 50 "$PY" "${BENCH[@]}" "$E2E" -k "dpo_step" --benchmark-json "$OUT/e2e_dpo.json" --e2e-json "$E2E_JSON"
stage estimate 120 "$PY" benchmarks/e2e.py estimate "$E2E_JSON"
stage ablation 150 "$PY" "${BENCH[@]}" "$E2E" -k "ablation" --benchmark-json "$OUT/e2e_ablation.json" \
  --e2e-json "$E2E_JSON"
if ((CUDA)); then
  stage ops_compile 120 "$PY" "${BENCH[@]}" "${OPS[@]}" -k "compile" --benchmark-max-time=0.25 \
    --benchmark-json "$OUT/ops_compile.json"
else
  log "ops_compile: skipped (no CUDA; SPO_FAST_BENCH_COMPILE=1 pytest benchmarks/ -k compile runs it on CPU)"
fi

{
  echo "== stages (name, rc, seconds)"
  cat "$OUT/stages.tsv"
  echo "== end-to-end"
  if [[ -f "$E2E_JSON" ]]; then
    "$PY" benchmarks/e2e.py report "$E2E_JSON" 2>&1
  else
    echo "no end-to-end summary ($E2E_JSON missing)"
  fi
} > "$OUT/report.txt"
cat "$OUT/report.txt"
log "done in $SECONDS s; results in $OUT"
