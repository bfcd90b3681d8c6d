#!/usr/bin/env bash
# The offline world's table for zero-shot, views, TPT, STS (n scenes per domain) and DiffTPT with
# the tiny random image-variation pipeline (dn scenes per domain), seed 0, then tta-report.
# Runs whichever tta-predict is on PATH (the before/after tables of docs/benchmarks.md ran it from
# two checkouts); extra arguments are Hydra overrides given to every run, e.g. data.render_size=128.
#   OMP_NUM_THREADS=1 bash benchmarks/crop_source_world.sh OUT [n] [dn] [overrides...]
set -euo pipefail
out=$1
n=${2:-100}
dn=${3:-20}
shift $(( $# < 3 ? $# : 3 ))
common=(seed=0 trainer.enable_progress_bar=false print_table=false)
tta-predict -m tta=none,views,tpt,sts data.n_per_domain="$n" "${common[@]}" hydra.sweep.dir="$out/sweep" "$@"
gen=tta.callbacks.difftpt.generator
tta-predict tta=difftpt data.n_per_domain="$dn" "${common[@]}" hydra.run.dir="$out/difftpt" \
    $gen.pretrained=tta-tiny-image-variation $gen.output_size=64 $gen.num_inference_steps=2 \
    $gen.cache_dir="$out/views" "$@"
tta-report "$out"
