#!/usr/bin/env bash
# The quality suite behind benchmarks/RESULTS.md (perplexity on the first 16,384 tokens of enwiki.test, windows of
# 1024, fp32; calibration 64 x 256 tokens of enwiki.train). About 50 minutes on 2 CPU cores.
#   MHA2MLA_ASSETS=/path/to/assets bash benchmarks/run_quality_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
A=${MHA2MLA_ASSETS:-$HOME/.cache/mha2mla-assets}
CAL="$A/text/enwiki.train.txt"
Q="python benchmarks/quality.py --assets $A --tasks="
$Q --calibration "$CAL" --out benchmarks/results/quality-calibrated.json
$Q --out benchmarks/results/quality-datafree.json
M0=expected_rotation=0,weighted_rope=0,output_weighted=0,balance_search=0,value_refit=0
$Q --calibration "$CAL" --budgets 96+32 --label "act-aware " --method $M0 --out benchmarks/results/ablation-1.json
$Q --calibration "$CAL" --budgets 96+32 --label "+out-weighted " --method weighted_rope=0,balance_search=0,value_refit=0 --out benchmarks/results/ablation-2.json
$Q --calibration "$CAL" --budgets 96+32 --label "+weighted-rope " --method balance_search=0,value_refit=0 --out benchmarks/results/ablation-3.json
$Q --calibration "$CAL" --budgets 96+32 --label "+balance-search " --method value_refit=0 --out benchmarks/results/ablation-4.json
$Q --calibration "$CAL" --budgets 96+32 --label "full+rho-fold " --method expected_rotation=1 --out benchmarks/results/ablation-5.json
