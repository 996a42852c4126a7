#!/usr/bin/env bash
# gpu_check.sh -- the device check of qwen3vl on ONE NVIDIA H200 (or H100), in under 9 minutes.
#
# Phases (each writes JSON lines to $OUT/results.jsonl; a summary table is printed last and written to
# $OUT/summary.txt). The Python pieces are benchmarks/gpu_check/gc_*.py.
#   env         torch/CUDA/NCCL/cuDNN, the GPU, packages, what the attention probes answer, the project's peak
#   cpu_ref     tiny + tiny-moe, fp32, on the CPU path (CUDA hidden: gloo, CPU backend); kept under $GC_REF
#   parity      the same weights and rows on the GPU: fp32 (TF32 off) logits/loss/grads vs the CPU (logits
#               <= 1e-4), bf16 tiny vs fp32 as a relative error, which kernel ran; probes F4 (parameters
#               left on the CPU by build_model_chunks) and F2 (MoE router NameError without TE)
#   pytest_gpu  the repository's GPU tests: python -m pytest --gpu (probes, kernels vs float64, fp32 SDPA
#               without the math fallback, tiny fp32 GPU = CPU, bf16 closeness, TE parity if TE is there)
#   train_none  the 2B, bf16, 8,192-token packed rows (8 samples with one ~1K-patch image each), the project's
#               ZeRO-1 wrapper, step, loop, FLOP count and metrics: tokens/s, TFLOP/s/GPU, MFU (medians after
#               3 warm-up steps), peak memory; then the host-device syncs of one step and a profiled step
#   attention   PackedCoreAttention fwd+bwd at 8K (LLM 6 segments, 1 segment, ViT 8 frame groups) and 32K:
#               varlen vs sdpa time, TFLOP/s, extra memory; fp32 sdpa at 8K (must not be O(s^2))
#   ddp_probe   F1: DDP overlap_grad_reduce with a text-only row after a row with media, then overlap off
#   pytest_cpu  CPU-suite tests run as CI runs them, on the GPU machine (F5: they must stay on the CPU)
#   train_full, train_sel   the 2B run again with full recompute, then selective (norms and MLP: [layernorm, mlp])
# GC_BUDGET_S (default 470) makes later phases skip, never overrun; every phase also has its own cap
# (GC_CAP_SCALE multiplies the caps and the minimums: a dry run on a small, shared CPU machine needs ~5).
#
# How to run it: docs/gpu.md. In short, from the project root, once, where pip works:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl megatron-core==0.16.1
# then on the GPU machine, with .whl/ carried along:  OUT=<results dir> bash benchmarks/gpu_check.sh
# Results: results.jsonl, summary.txt, gpu_check.log, profile_2B_none.txt, metrics_<run>.jsonl (7 files).
#
# Dry run on a CPU machine (the plumbing of every phase; the tiny model instead of the 2B, short rows):
#   GC_PYTHON=python GC_DEVICE=cpu GC_SKIP_INSTALL=1 GC_TRAIN_PRESET=tiny GC_SEQ=1024 GC_CAP_SCALE=5 \
#       GC_BUDGET_S=3000 OUT=/tmp/gc_out bash benchmarks/gpu_check.sh
set -u
T0=$SECONDS
BUDGET=${GC_BUDGET_S:-470}
SCALE=${GC_CAP_SCALE:-1}
PY=${GC_PYTHON:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export OUT=${OUT:-/tmp/gc_out}
export GC_OUT=$OUT
export GC_REF=${GC_REF:-/tmp/gc/ref}
export GC_DEVICE=${GC_DEVICE:-cuda}
TRAIN_PRESET=${GC_TRAIN_PRESET:-2B}
SEQ=${GC_SEQ:-8192}
W=/tmp/gc
mkdir -p "$OUT" "$GC_REF" "$W/pkg" "$W/runs"
LOG=$OUT/gpu_check.log
: > "$LOG"
export PYTHONUNBUFFERED=1
export PYTHONWARNINGS="ignore::FutureWarning,ignore::DeprecationWarning"
# The repository root is the package 'qwen3vl' (setup.py maps it so); a link makes it importable without pip.
ln -sfn "$REPO" "$W/pkg/qwen3vl"
SITE=
if [ -z "${GC_SKIP_INSTALL:-}" ]; then
  # megatron-core 0.16.1 (and any other wheel the machine lacks) travels in .whl/; no network there.
  ls "$REPO"/.whl/megatron_core-0.16.1-*.whl >/dev/null 2>&1 || { echo "[gc] no megatron-core wheel in .whl/ (docs/gpu.md)"; exit 3; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$REPO"/.whl/*.whl >>"$LOG" 2>&1 || { echo "[gc] installing .whl/*.whl failed (see gpu_check.log)"; exit 3; }
  SITE=/tmp/site
fi
export PYTHONPATH=$W/pkg:$REPO/tests/support:$REPO/benchmarks/gpu_check${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}
if [ "$GC_DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >>"$LOG" 2>&1
fi

left() { echo $(( BUDGET - (SECONDS - T0) )); }
# phase NAME MIN_SECONDS CAP_SECONDS cmd...: runs when at least MIN_SECONDS of the budget remain, for at most
# min(CAP, what remains); prints the phase's [gc] lines; on failure also the last lines of its log.
phase() {
  local name=$1 need=$(( $2 * SCALE )) cap=$(( $3 * SCALE )); shift 3
  local rem; rem=$(left)
  if [ "$rem" -lt "$need" ]; then
    echo "[gc] SKIP $name: ${rem}s of budget left, needs ${need}s" | tee -a "$LOG"
    printf '{"section":"phase","name":"%s","rc":"skipped"}\n' "$name" >> "$OUT/results.jsonl"
    return
  fi
  local lim=$(( cap < rem ? cap : rem ))
  local start=$SECONDS
  echo "[gc] === $name (limit ${lim}s) ===" | tee -a "$LOG"
  timeout --kill-after=5 "$lim" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  cat "$W/$name.log" >> "$LOG"
  grep -a '^\[gc\]' "$W/$name.log" | cut -c1-700
  if [ $rc -ne 0 ]; then
    echo "[gc] $name exited rc=$rc; last lines:"
    grep -av 'UserWarning\|warnings.warn' "$W/$name.log" | tail -n 15 | cut -c1-300
  fi
  printf '{"section":"phase","name":"%s","rc":%d,"seconds":%d}\n' "$name" "$rc" $(( SECONDS - start )) >> "$OUT/results.jsonl"
}

GC=$REPO/benchmarks/gpu_check
export GC_RUNS=$W/runs  # run directories stay on the device; only their metrics.jsonl come back
cd "$REPO"
phase env        20  60 $PY "$GC/gc_env.py"
phase cpu_ref    40 120 env CUDA_VISIBLE_DEVICES= $PY "$GC/gc_cpu_ref.py" tiny tiny-moe
phase parity     40 120 $PY "$GC/gc_parity.py" tiny tiny-moe
if [ "$GC_DEVICE" = cuda ]; then
  phase pytest_gpu 60 150 $PY -m pytest --gpu -q -rfEs -p no:cacheprovider tests/model/test_attention_gpu.py \
      tests/model/test_model_gpu.py tests/model/test_bf16.py
fi
phase train_none 90 200 $PY "$GC/gc_train.py" --preset "$TRAIN_PRESET" --seq "$SEQ" --steps 10 --recompute none --syncs --profile
phase attention  30  90 $PY "$GC/gc_attn.py"
phase ddp_probe  30  90 $PY "$GC/gc_ddp_probe.py"
phase pytest_cpu 40 100 $PY -m pytest -q -rfEs -p no:cacheprovider tests/model/test_attention.py \
    tests/parallel/test_harness.py::test_the_suite_stays_on_the_cpu_where_a_gpu_is_visible
phase train_full 70 150 $PY "$GC/gc_train.py" --preset "$TRAIN_PRESET" --seq "$SEQ" --steps 6 --recompute full
phase train_sel  70 150 $PY "$GC/gc_train.py" --preset "$TRAIN_PRESET" --seq "$SEQ" --steps 6 --recompute selective
for metrics in "$W"/runs/run_*/metrics.jsonl; do
  [ -f "$metrics" ] && cp "$metrics" "$OUT/metrics_$(basename "$(dirname "$metrics")" | sed 's/^run_//').jsonl"
done
$PY "$GC/gc_summary.py"
ls -1 "$OUT"
echo "[gc] total wall ${SECONDS}s (budget ${BUDGET}s)"
