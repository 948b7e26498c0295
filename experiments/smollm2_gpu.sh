#!/usr/bin/env bash
# Full-protocol runs of the embedded SmolLM2-135M on one GPU (the numbers in docs/results.md):
# issue 2 (fp, rotation-only, RTN, QuaRot-RTN, QuaRot-GPTQ at W4A4KV4), issue 3 (BASE-Q and the Table 2
# ladder), BASE-Q's peak device memory for the model truncated to 10 vs 30 blocks, and issue 5's check that
# the W4A4 Triton runtime gives the fake-quant perplexity (quarot_kernels, baseq_kernels, and
# baseq_kernels_short: one epoch per stage, to fit one 10-minute device call).
# Usage: DATA_ROOT=/path/to/data RESULTS=/path/to/results experiments/smollm2_gpu.sh [job ...]
# Each job writes one record under $RESULTS/runs and a log under $RESULTS/logs; progress in logs/progress.
set -u
cd "$(dirname "$0")/.."
R=${RESULTS:-results/smollm2_gpu}; L=$R/logs; mkdir -p "$L"
common=(model=smollm2-135m device=cuda "data_root=${DATA_ROOT:-}" "results_dir=$R" "compare_with=[]")
declare -A JOBS=(
  [fp]="method=fp"
  [w16]="method=quarot quant=w16a16kv16"
  [rtn]="method=rtn"
  [quarot_rtn]="method=quarot_rtn"
  [quarot]="method=quarot"
  [baseq]="method=baseq"
  [ladder_quarot]="method=baseq_ablation/quarot"
  [ladder_rv]="method=baseq_ablation/rv"
  [ladder_rv_bias]="method=baseq_ablation/rv_bias"
  [ladder_rv_bias_ascale]="method=baseq_ablation/rv_bias_ascale"
  [mem10]="method=baseq model.num_layers=10 method.stage1_epochs=1 method.stage2_epochs=1 eval.ppl.max_windows=4"
  [mem30]="method=baseq model.num_layers=30 method.stage1_epochs=1 method.stage2_epochs=1 eval.ppl.max_windows=4"
  [quarot_kernels]="method=quarot eval.kernels=true"
  [baseq_kernels]="method=baseq eval.kernels=true"
  [baseq_kernels_short]="method=baseq method.stage1_epochs=1 method.stage2_epochs=1 eval.kernels=true"
)
ORDER=(fp w16 rtn quarot_rtn quarot baseq ladder_quarot ladder_rv ladder_rv_bias ladder_rv_bias_ascale mem10 mem30
       quarot_kernels baseq_kernels)
[ $# -gt 0 ] && ORDER=("$@")
for job in "${ORDER[@]}"; do
  echo "$(date -u +%FT%TZ) start $job" >> "$L/progress"
  # shellcheck disable=SC2086
  python run.py "${common[@]}" ${JOBS[$job]} > "$L/$job.log" 2>&1
  rc=$?
  echo "$(date -u +%FT%TZ) end $job rc=$rc" >> "$L/progress"
done
