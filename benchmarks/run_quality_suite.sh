#!/usr/bin/env bash
# The quality suite behind benchmarks/RESULTS.md (perplexity on the first 16,384 tokens of enwiki.test, windows of
# 1024, fp32; calibration from enwiki.train: 48 x 512 tokens by default, 64 x 256 for the ablation rows 1-11, 96 x 256
# for rows 12-15).
# About 70 minutes on 2 CPU cores.
#   MHA2MLA_ASSETS=/path/to/assets bash benchmarks/run_quality_suite.sh [all|main|ablation]
set -euo pipefail
cd "$(dirname "$0")/.."
A=${MHA2MLA_ASSETS:-$HOME/.cache/mha2mla-assets}
CAL="$A/text/enwiki.train.txt"
Q="python benchmarks/quality.py --assets $A --tasks="
WHAT=${1:-all}
if [[ $WHAT == all || $WHAT == main ]]; then
  $Q --calibration "$CAL" --out benchmarks/results/quality-calibrated-len512.json
  $Q --out benchmarks/results/quality-datafree.json
fi
if [[ $WHAT == all || $WHAT == ablation ]]; then
  # Each row adds one ingredient to the row above it (96+32, 64 calibration sequences).
  AB="$Q --calibration $CAL --calibration-samples 64 --calibration-length 256 --budgets 96+32"
  # rows 1-11 predate the query fit (and its cheaper output-fit/context settings) and the drift corrections: pinned off
  PRE=query_fit=0,output_fit_stride=1,context_sequences=64,drift_correction=0,mlp_drift=0
  NEW=output_fit=0,sequential=0,attention_weighted_keys=0,$PRE
  M0=expected_rotation=0,weighted_rope=0,output_weighted=0,balance_search=0,value_refit=0,$NEW
  $AB --label "act-aware " --method $M0 --out benchmarks/results/ablation-1.json
  $AB --label "+out-weighted " --method weighted_rope=0,balance_search=0,value_refit=0,expected_rotation=0,$NEW --out benchmarks/results/ablation-2.json
  $AB --label "+weighted-rope " --method balance_search=0,value_refit=0,expected_rotation=0,$NEW --out benchmarks/results/ablation-3.json
  $AB --label "+balance-search " --method value_refit=0,expected_rotation=0,$NEW --out benchmarks/results/ablation-4.json
  $AB --label "+value-refit " --method value_refit=1,alternating=0,expected_rotation=0,$NEW --out benchmarks/results/ablation-5.json
  $AB --label "+rho-fold " --method value_refit=1,alternating=0,$NEW --out benchmarks/results/ablation-6.json
  $AB --label "+output-fit " --method value_refit=1,alternating=0,sequential=0,attention_weighted_keys=0,$PRE --out benchmarks/results/ablation-7.json
  $AB --label "+attn-weighted-keys " --method value_refit=1,alternating=0,sequential=0,$PRE --out benchmarks/results/ablation-8.json
  $AB --label "+sequential " --method value_refit=1,alternating=0,$PRE --out benchmarks/results/ablation-9.json
  $AB --label "-value-refit " --method value_refit=0,alternating=0,$PRE --out benchmarks/results/ablation-10.json
  $AB --label "+context-ALS latent " --method $PRE --out benchmarks/results/ablation-11.json
  # row 12 (96 x 256 tokens, query fit off), row 13 (+ query fit), row 14 (+ drift correction of the output fit),
  # row 15 (+ MLP refit) at that session's sequence settings (the drift corrections forced on: the defaults now leave
  # them off at 96+32); row 16 (48 x 512 tokens) with them, row 17 (the default, without them) is the main table's
  OLD="$Q --calibration $CAL --calibration-samples 96 --calibration-length 256 --budgets 96+32"
  SEQ=context_sequences=32,query_fit_sequences=4,drift_below_share=inf
  $OLD --label "+query-fit " --method drift_correction=0,mlp_drift=0,$SEQ --out benchmarks/results/ablation-13.json
  $OLD --label "+drift-correction " --method mlp_drift=0,$SEQ --out benchmarks/results/ablation-14.json
  $OLD --label "+mlp-refit " --method $SEQ --out benchmarks/results/ablation-15.json
  $Q --calibration "$CAL" --budgets 96+32 --label "48x512 " --method drift_below_share=inf --out benchmarks/results/ablation-16.json
fi
