#!/usr/bin/env bash
# Real-scale figures on one GPU, for a session that is lent one (about 6 minutes on an H100-class
# card; each step has its own time limit so the whole stays under 8 minutes):
#   1. real_scale.py at native sizes in float16: SD 1.5 at 512², SDXL at 1024² (published
#      architectures, random weights, nothing downloaded): peak GPU memory, seconds per UNet
#      image-evaluation, each stage's share of one generation, bytes per image of the run folder;
#   2. hyperbatch.py --arch sd15 / sdxl at native size in float16: UNet image-evaluations and wall
#      time of hyperbatch against plain batches.
# Every step prints its headline figures last as `name: value`; run from the repository root:
#   bash benchmarks/gpu.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out="${1:-${OUT:-/tmp/embedpin-gpu}}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" || exit 2
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its log
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | tail -n 25
  echo "== $name: exit ${PIPESTATUS[0]}"
}
step real_scale_sd15 120 python benchmarks/real_scale.py --arch sd15 --size 512 --device cuda --dtype float16
step real_scale_sdxl 180 python benchmarks/real_scale.py --arch sdxl --sdxl-size 1024 --size 1024 --device cuda --dtype float16
step hyperbatch_sd15 60 python benchmarks/hyperbatch.py --arch sd15 --quick --device cuda --dtype float16
step hyperbatch_sdxl 90 python benchmarks/hyperbatch.py --arch sdxl --quick --device cuda --dtype float16
echo "logs in $out"
