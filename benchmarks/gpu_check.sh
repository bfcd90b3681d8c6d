#!/usr/bin/env bash
# The GPU check, one command for a machine with a CUDA GPU, after the README's install of the
# tests (pip install -e ".[test]"):
#
#   bash benchmarks/gpu_check.sh
#
# 1. the GPU tier of the tests (pytest -m gpu, tests/test_gpu.py): every method through the
#    tta-predict config with trainer=gpu on a small world run, in fp32 (against the CPU run of the
#    same command), bf16 and fp16, with probes on the device and dtype of the tensors that matter
#    and on the user's model; its log goes to benchmarks/results/gpu_check_tests.txt;
# 2. benchmarks/tpt_sts_gpu.py: ViT-B/16 (random weights), 1000 ImageNet class names, 64 views;
#    one table (method, precision, ms per image, peak GB, time relative to the reference-style
#    TPT), printed and written to benchmarks/results/tpt_sts_gpu.md.
#
# Stops at once, before any work, without a CUDA device or without pytest. Both parts run;
# the exit status is non-zero if either failed. Within 8 minutes on one H200 (each part has a
# time limit: 300 s and 180 s; the estimate is in docs/benchmarks.md). PYTHON=... picks the
# interpreter (default: python).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

"$PYTHON" - <<'EOF' || exit 2
import sys

try:
    import torch
except ImportError:
    sys.exit("gpu_check: torch is not importable: run the README's install first")
if not torch.cuda.is_available():
    sys.exit(
        f"gpu_check: torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False): "
        "run this on a machine with an NVIDIA GPU and a CUDA build of torch"
    )
try:
    import pytest  # noqa: F401
except ImportError:
    sys.exit('gpu_check: pytest is not installed: pip install -e ".[test]"')
print(f"gpu_check: {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}")
EOF

mkdir -p benchmarks/results
status=0
echo "gpu_check: 1/2 the GPU tier (pytest -m gpu)"
timeout 300 "$PYTHON" -m pytest -m gpu -q --durations=15 -p no:cacheprovider tests \
    2>&1 | tee benchmarks/results/gpu_check_tests.txt
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: the GPU tier FAILED (or ran past 300 s)"; status=1; }

echo "gpu_check: 2/2 benchmarks/tpt_sts_gpu.py"
timeout 180 "$PYTHON" benchmarks/tpt_sts_gpu.py --out benchmarks/results/tpt_sts_gpu.md \
    || { echo "gpu_check: the benchmark FAILED (or ran past 180 s)"; status=1; }

[ "$status" -eq 0 ] && echo "gpu_check: passed" || echo "gpu_check: FAILED"
exit "$status"
