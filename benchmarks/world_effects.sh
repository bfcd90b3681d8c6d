#!/usr/bin/env bash
# Every method's effect on the offline world, with the commands a user types (issue 15's final
# measurement; run it once views are cropped from the originals and Search-TTA reads the ViT's
# patch tokens). Writes everything under OUT (default multirun/world_effects):
#
#   benchmarks/world_effects.sh [OUT]              # the full measurement (CPU time: docs/world.md)
#   SMOKE=1 benchmarks/world_effects.sh /tmp/we    # tiny sizes: every command runs, in minutes
#
# 1. shifts/: tta=none,views,tpt,sts,difftpt on clean + the six shifts at severity 3, N scenes per
#    domain, seeds 0,1,2 (DiffTPT with the tiny RANDOM image-variation pipeline, 2 denoising
#    steps: plumbing and cost only, its views are noise); then tta-report.
# 2. streams/: zero-shot, LAME and STS+LAME on the iid, sorted and Dirichlet(0.1) streams
#    (batch 64), same seeds; then tta-report.
# 3. ttm_*.md: TTM on the world's compositional groups, raw and after TTM, for the default ViT
#    (InfoNCE) and its SigLIP-style twin (sigmoid loss), benchmarks/ttm_world.py.
# 4. search_world.md: Search-TTA over EPISODES search episodes, benchmarks/search_world.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-multirun/world_effects}
if [[ "${SMOKE:-0}" == 1 ]]; then
  N=4 SEEDS=0 EPISODES=2 BATCH=4 TTM_ARGS=(--sweep-n 4 --n-per-cell 4 --epochs 1)
else
  N=500 SEEDS=0,1,2 EPISODES=200 BATCH=64 TTM_ARGS=()
fi
# one thread per process: on a small shared CPU a second intra-op thread mostly waits
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TINY_DIFFUSION=(
  ++tta.callbacks.difftpt.generator.pretrained=tta-tiny-image-variation
  ++tta.callbacks.difftpt.generator.output_size=64
  ++tta.callbacks.difftpt.generator.num_inference_steps=2
)
start=$(date +%s)
step() { echo "[$(($(date +%s) - start)) s] $*"; }

step "1/4 episodic methods over the six shifts"
tta-predict -m tta=none,views,tpt,sts,difftpt "${TINY_DIFFUSION[@]}" seed="$SEEDS" data.n_per_domain="$N" \
  data.batch_size="$BATCH" print_table=false hydra.sweep.dir="$OUT/shifts"
tta-report "$OUT/shifts"

step "2/4 LAME and STS+LAME on realistic streams"
tta-predict -m 'tta=none,lame,[sts,lame]' data.stream=iid,sorted,dirichlet seed="$SEEDS" data.n_per_domain="$N" \
  data.batch_size="$BATCH" print_table=false hydra.sweep.dir="$OUT/streams"
tta-report "$OUT/streams"

step "3/4 TTM on the compositional groups"
python benchmarks/ttm_world.py --model tta-world-vit --out "$OUT/ttm_world_vit.md" "${TTM_ARGS[@]}"
python benchmarks/ttm_world.py --model tta-world-resnet-siglip --out "$OUT/ttm_world_vit_siglip.md" "${TTM_ARGS[@]}"

step "4/4 Search-TTA over $EPISODES episodes"
python benchmarks/search_world.py --episodes "$EPISODES" --out "$OUT/search_world.md"

step "done: $OUT"
