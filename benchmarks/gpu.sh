#!/usr/bin/env bash
# One prepared GPU run: the checks of the heal, inference and calibration issues that need an accelerator.
#
#   bash benchmarks/gpu.sh ASSETS OUT            # on a CUDA machine (no network needed)
#   DEVICE=cpu SMOKE=1 bash benchmarks/gpu.sh ASSETS /tmp/gpu-smoke   # the same steps, tiny, on a CPU
#
# ASSETS holds tok/ (SmolLM2-135M's config.json and tokenizer files), enwiki.train.txt and enwiki.test.txt
# (python ../shared/assets/prepare.py builds them). Real weights are not needed: every model is random-initialised with
# real shapes, so the numbers are speed and memory, not quality. Steps (each under its own time limit, each logged):
#   1. benchmarks/inference.py: bf16 decode tok/s and GPU memory at 4k/16k, source vs stock MLA vs absorbed MLA,
#      SmolLM2-135M and Llama-2-7B shapes.
#   2. a random SmolLM2-shaped Llama with the real tokenizer; `mha2mla convert --calibration --device cuda` at 96+32.
#   3. `mha2mla heal` with recipes/smollm2-135m-1gpu.yaml (short: 20 steps), cross-entropy, then distillation; the
#      heal record's peak GPU memory, tokens/s and memory plan (checkpointing, attention, loss chunk) go to
#      heal-gpu.json. With HEAL_BEFORE=DIR (an older `mha2mla` package and its recipes, e.g. made by
#      `git archive COMMIT mha2mla recipes | tar -x -C DIR`, carried with the tree), benchmarks/heal_memory.py also
#      measures that code (with its own copy of the recipe) and this one with distillation, same steps:
#      heal-memory-gpu.json.
#   4. benchmarks/convert_scale.py: calibrated conversion at 512+64 of a random llama3-8b (SCALE_LAYERS layers, default
#      32) and of one llama3-70b layer: seconds per layer, peak GPU memory, peak host RSS.
# Writes OUT/log.txt, OUT/inference-gpu.json, OUT/convert-gpu.json, OUT/heal-gpu.json,
# OUT/convert-scale-llama3-8b-gpu.json, OUT/convert-scale-llama3-70b-gpu.json
# (and OUT/heal-memory-gpu.json with HEAL_BEFORE).
set -u
A=$(realpath "${1:-gpu_assets}")
O=$(mkdir -p "${2:-${OUT:-/tmp/gpu-out}}" && realpath "${2:-${OUT:-/tmp/gpu-out}}")
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
W=$(mktemp -d)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
log() { echo "== $(date +%T) $*" | tee -a "$O/log.txt"; }
step() {  # step SECONDS NAME CMD...: run with a time limit, output into the log
  local t=$1 name=$2; shift 2
  log "$name"
  local s=$SECONDS
  timeout "$t" "$@" >>"$O/log.txt" 2>&1
  local rc=$?
  log "$name: exit $rc after $((SECONDS - s)) s"
  return $rc
}

if [ "$SMOKE" = 1 ]; then
  INF=(--configs tiny --contexts 256 --new-tokens 4 --dtype float32)
  SRC_LAYERS=2; CAL=(--calibration-samples 4 --calibration-length 64)
  HEAL=(--max-steps 2 --micro-batch-size 1 --grad-accum 1 --seq-len 64 --mixed-precision no)
  BIG=()  # calibrated 8B/70B-width layers take many minutes on a CPU: skipped
else
  INF=(--configs smollm2,llama2-7b --contexts 4096,16384 --new-tokens 32 --dtype bfloat16)
  SRC_LAYERS=30; CAL=()
  HEAL=(--max-steps 20)
  BIG=(on)
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
} >>"$O/log.txt" 2>&1

step 200 "inference" $PY benchmarks/inference.py --device "$DEVICE" --threads 0 "${INF[@]}" --out "$O/inference-gpu.json"

log "random SmolLM2-shaped source"
$PY - "$A/tok" "$W/src" "$SRC_LAYERS" >>"$O/log.txt" 2>&1 <<'EOF'
import shutil, sys, torch
from pathlib import Path
from transformers import AutoConfig, LlamaForCausalLM
tok, out, layers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
cfg = AutoConfig.from_pretrained(tok)
cfg.num_hidden_layers = layers
torch.manual_seed(0)
LlamaForCausalLM(cfg).save_pretrained(out)
for f in tok.iterdir():
    if f.name.startswith(("tokenizer", "special_tokens", "generation")):
        shutil.copy(f, out / f.name)
print("source:", out, sum(p.stat().st_size for p in out.iterdir()) // 2**20, "MiB")
EOF

if step 90 "convert (calibrated, $DEVICE)" $PY -m mha2mla convert "$W/src" --output "$W/mla" --rank 96 --rope-dim 32 \
    --calibration "$A/enwiki.train.txt" "${CAL[@]}" --device "$DEVICE" -q; then
  cp "$W/mla/mha2mla.json" "$O/convert-gpu.json"
else
  step 60 "convert (data-free fallback)" $PY -m mha2mla convert "$W/src" --output "$W/mla" --rank 96 --rope-dim 32 --force -q
fi

step 75 "heal (cross-entropy, recipes/smollm2-135m-1gpu.yaml)" $PY -m mha2mla heal "$W/mla" --output "$W/healed" \
  --recipe recipes/smollm2-135m-1gpu.yaml --data "$A/enwiki.train.txt" --save-every 0 --set warmup_steps=5 \
  --set decay_steps=5 "${HEAL[@]}"
step 75 "heal (distillation from the source)" $PY -m mha2mla heal "$W/mla" --output "$W/healed-kd" --teacher "$W/src" \
  --recipe recipes/smollm2-135m-1gpu.yaml --data "$A/enwiki.train.txt" --save-every 0 --set warmup_steps=5 \
  --set decay_steps=5 "${HEAL[@]}"
$PY - "$W" "$O/heal-gpu.json" >>"$O/log.txt" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
w, out = Path(sys.argv[1]), Path(sys.argv[2])
runs = {}
for name in ("healed", "healed-kd"):
    p = w / name / "mha2mla.json"
    if p.exists():
        h = json.loads(p.read_text())["heal"]
        runs[name] = {k: h.get(k) for k in ("steps", "tokens", "seconds", "tokens_per_second", "peak_device_memory_bytes",
                                              "memory", "losses", "teacher", "num_processes", "recipe", "versions")}
        print(name, "tok/s", h.get("tokens_per_second"), "peak GPU GiB",
              None if h.get("peak_device_memory_bytes") is None else round(h["peak_device_memory_bytes"] / 2**30, 2))
out.write_text(json.dumps(runs, indent=1))
EOF
if [ -n "${HEAL_BEFORE:-}" ] && [ -d "${HEAL_BEFORE}/mha2mla" ]; then
  R=recipes/smollm2-135m-1gpu.yaml
  [ "$SMOKE" = 1 ] && HM=(--steps 2 --seq-len 64 --micro-batch 1) || HM=(--steps 10)
  step 240 "heal memory, before ($HEAL_BEFORE) and after, distillation" $PY benchmarks/heal_memory.py --model "$W/mla" \
    --teacher "$W/src" --data "$A/enwiki.train.txt" --device "$DEVICE" "${HM[@]}" \
    --config "before-kd:code=$(realpath "$HEAL_BEFORE"),recipe=$HEAL_BEFORE/$R,warmup_steps=2,decay_steps=2" \
    --config "after-kd:recipe=$R,warmup_steps=2,decay_steps=2" --out "$O/heal-memory-gpu.json"
fi

if [ ${#BIG[@]} -gt 0 ]; then  # real sizes: llama3-8b (SCALE_LAYERS layers, default all 32) and one llama3-70b layer
  step 420 "convert llama3-8b x ${SCALE_LAYERS:-32} layers (calibrated, $DEVICE)" $PY benchmarks/convert_scale.py \
    --shape llama3-8b --layers "${SCALE_LAYERS:-32}" --tokenizer "$A/tok" --calibration "$A/enwiki.train.txt" \
    --device "$DEVICE" --work-dir "$W/cs" --json "$O/convert-scale-llama3-8b-gpu.json"
  rm -rf "$W/cs"
  step 240 "convert one llama3-70b layer (calibrated, $DEVICE)" $PY benchmarks/convert_scale.py \
    --shape llama3-70b --layers 1 --tokenizer "$A/tok" --calibration "$A/enwiki.train.txt" \
    --device "$DEVICE" --work-dir "$W/cs" --json "$O/convert-scale-llama3-70b-gpu.json"
fi
rm -rf "$W"
log "done"
