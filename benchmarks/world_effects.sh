#!/usr/bin/env bash
# Every method's effect on the offline world, with the commands a user types. Writes everything
# under OUT (default multirun/world_effects); PARTS picks the parts (default "1 2 3 4 5"), so two
# shells can share a 2-core machine (PARTS="1 2 5" in one, PARTS="3 4" in the other):
#
#   benchmarks/world_effects.sh [OUT]              # the full measurement (CPU time: docs/world.md)
#   SMOKE=1 benchmarks/world_effects.sh /tmp/we    # tiny sizes: every command runs, in minutes
#
# 1. shifts/: tta=none,views,tpt,sts,zero,mta,ctpt on clean + the six shifts at severity 3, N per domain,
#    seeds 0,1,2; then tta-report.
# 2. streams/: zero-shot, LAME and STS+LAME on the iid, sorted and Dirichlet(0.1) streams
#    (batch 64), same seeds; then tta-report.
# 3. ttm_*.md: TTM on the world's compositional groups, raw and after TTM, for the default model
#    (InfoNCE) and its SigLIP-style twin (sigmoid loss), benchmarks/ttm_world.py.
# 4. search_world*.md: Search-TTA over EPISODES search episodes, benchmarks/search_world.py: the
#    default model scoring cell crops (16 x 16 grid), and the ViT's patch tokens (8 x 8 grid).
# 5. difftpt/: DiffTPT beside TPT on DIFF_N scenes per domain, seed 0, with the world's generator
#    (tta-world-image-variation, the tta=difftpt default) at 10 denoising steps instead of the
#    default 50: a fifth of the cost at the same DiffTPT accuracy on the world
#    (benchmarks/results/difftpt_world_generator.md); ~5.8 s of views per image on one CPU thread,
#    hence the smaller N. SMOKE=1: 2 steps.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-multirun/world_effects}
if [[ "${SMOKE:-0}" == 1 ]]; then
  N=4 DIFF_N=2 SEEDS=0 EPISODES=2 BATCH=4 TTM_ARGS=(--sweep-n 4 --n-per-cell 4 --epochs 1)
else
  N=${N:-200} DIFF_N=${DIFF_N:-50} SEEDS=0,1,2 EPISODES=${EPISODES:-200} BATCH=64 TTM_ARGS=()
fi
PARTS=${PARTS:-1 2 3 4 5}
# one thread per process: on a small shared CPU a second intra-op thread mostly waits
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DIFFUSION_STEPS=(++tta.callbacks.difftpt.generator.num_inference_steps=$([[ "${SMOKE:-0}" == 1 ]] && echo 2 || echo 10))
start=$(date +%s)
step() { echo "[$(($(date +%s) - start)) s] $*"; }

if [[ " $PARTS " == *" 1 "* ]]; then
  step "1 episodic methods over the six shifts"
  tta-predict -m tta=none,views,tpt,sts,zero,mta,ctpt seed="$SEEDS" data.n_per_domain="$N" \
    data.batch_size="$BATCH" print_table=false hydra.sweep.dir="$OUT/shifts"
  tta-report "$OUT/shifts"
fi
if [[ " $PARTS " == *" 2 "* ]]; then
  step "2 LAME and STS+LAME on realistic streams"
  tta-predict -m 'tta=none,lame,[sts,lame]' data.stream=iid,sorted,dirichlet seed="$SEEDS" \
    data.n_per_domain="$N" data.batch_size="$BATCH" print_table=false hydra.sweep.dir="$OUT/streams"
  tta-report "$OUT/streams"
fi
if [[ " $PARTS " == *" 3 "* ]]; then
  step "3 TTM on the compositional groups"
  python benchmarks/ttm_world.py --model tta-world-resnet --out "$OUT/ttm_world.md" "${TTM_ARGS[@]}"
  python benchmarks/ttm_world.py --model tta-world-resnet-siglip --out "$OUT/ttm_world_siglip.md" "${TTM_ARGS[@]}"
fi
if [[ " $PARTS " == *" 4 "* ]]; then
  step "4 Search-TTA over $EPISODES episodes"
  python benchmarks/search_world.py --episodes "$EPISODES" --out "$OUT/search_world.md"
  # the ViT's patch tokens score the cells: one token per cell, so its 8 x 8 token grid
  python benchmarks/search_world.py --model tta-world-vit --grid 8 --budget 16 --episodes "$EPISODES" \
    --out "$OUT/search_world_vit_tokens.md"
fi
if [[ " $PARTS " == *" 5 "* ]]; then
  step "5 DiffTPT (the world's generator) beside TPT"
  for method in tpt difftpt; do
    extra=()
    [[ $method == difftpt ]] && extra=("${DIFFUSION_STEPS[@]}")
    tta-predict -m tta="$method" "${extra[@]}" seed=0 data.n_per_domain="$DIFF_N" data.batch_size="$BATCH" \
      print_table=false hydra.sweep.dir="$OUT/difftpt/$method"
  done
  tta-report "$OUT/difftpt"
fi

step "done: $OUT"
