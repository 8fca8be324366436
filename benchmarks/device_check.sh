#!/usr/bin/env bash
# The GPU checks in one run: what a blend costs on a GPU (split against one fused adapter), and the toy recipe
# trained and judged there. Each stage has its own time limit, so one that fails or overruns leaves the others.
#
#   bash benchmarks/device_check.sh OUT_DIR            # on a CUDA machine with this repo's Python stack
#   SMALL=1 bash benchmarks/device_check.sh OUT_DIR    # a quick dry run of every stage on the CPU
#   ONLY_TOY_TRAINING=1 bash benchmarks/device_check.sh OUT_DIR   # stage 4 alone
#   ONLY_COST=1 bash benchmarks/device_check.sh OUT_DIR           # stages 1-3 alone (about 5 minutes on an H200)
#
# On a machine whose Python lacks this repo's pins, install them beside it first (pure-Python wheels: diffusers,
# transformers, peft, tomli_w at the versions in pyproject.toml) and put them on PYTHONPATH.
# Writes OUT_DIR/NAME.log per stage (the evaluations as JSON), the three toy adapters (OUT_DIR/adapters/) and
# OUT_DIR.tgz with all of it but the training checkpoints. Figures: docs/results.md, "The split blend mode", "Cost".
set -u
out=${1:?give an output folder}
mkdir -p "$out/adapters"
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
stylelora=("$py" -c 'import sys; from stylelora.cli import main; sys.exit(main())')  # the CLI, uninstalled

if [ "${SMALL:-0}" = 1 ]; then
  device=cpu; precision=fp32; dtype=float32; families="toy"; repeats=2; images=1; steps=30; samples=4
else
  device=cuda; precision=fp16; dtype=float16; families="sd15 sdxl"; repeats=20; images=5; steps=1000; samples=96
fi

stage() {  # stage NAME SECONDS COMMAND...: run it with a time limit, its output to NAME.log and to the screen
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep -v -i -E 'kernels|should be kept in float32|Loading weights|it/s\]' "$out/$name.log" | tail -25
  echo "== $name: rc $rc, $((SECONDS - start)) s"
}

pack() {  # pack OUT as OUT.tgz (training checkpoints left out), listing what it holds and any folders named
  ls -la "$out" "$@"
  tar czf "$out.tgz" --exclude="$(basename "$out")/run-*/checkpoints" -C "$(dirname "$out")" "$(basename "$out")"
  ls -la "$out.tgz"
}

"$py" -c 'import torch, diffusers, transformers, peft; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "", "diffusers", diffusers.__version__,
"transformers", transformers.__version__, "peft", peft.__version__)'

if [ "${ONLY_TOY_TRAINING:-0}" != 1 ]; then  # ONLY_TOY_TRAINING=1: stage 4 alone
# 1. One UNet call, plain against split for two adapters, at each family's native size: the first step of an image
#    (keys and values computed) and a later one (reused).
for family in $families; do
  stage "split-cost-$family" 120 "$py" benchmarks/split_cost.py --family "$family" --device "$device" --dtype "$dtype" \
    --repeats "$repeats"
  stage "split-cost-$family-later" 120 "$py" benchmarks/split_cost.py --family "$family" --device "$device" \
    --dtype "$dtype" --repeats "$repeats" --later-step
done

# 2. Whole images on the toy base (fp32, as it ships), every blend mode against one fused adapter.
stage generate-speed-toy 120 "$py" benchmarks/generate_speed.py --device "$device" --images "$images" --weight-changes 4

# 3. Whole images on a random-init SD 1.5 (the published architecture, fp16 on the GPU).
if [ "${SMALL:-0}" != 1 ]; then
  stage build-sd15 150 "$py" -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks')
from memory import build_sd15_base; print(build_sd15_base(Path('/tmp/sd15-random')))"
  stage generate-speed-sd15 240 "$py" benchmarks/generate_speed.py --base /tmp/sd15-random --device "$device" \
    --precision "$precision" --images "$images" --weight-changes 3
fi

fi

if [ "${ONLY_COST:-0}" = 1 ]; then  # ONLY_COST=1: stages 1-3 alone
  pack
  exit 0
fi

# 4. The three toy adapters trained with the defaults, side by side, then judged alone and in pairs.
for name in stripes pastel zorb; do
  (export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}; stage "train-$name" 300 "${stylelora[@]}" train "datasets/toy-$name" --steps "$steps" --no-samples \
     --output "$out/run-$name" --output-name "toy-$name" && cp "$out/run-$name/toy-$name.safetensors" "$out/adapters/") &
done
wait
adapter() { echo "$out/adapters/toy-$1.safetensors"; }
for name in stripes pastel zorb; do
  stage "eval-$name" 200 "${stylelora[@]}" evaluate --lora "$(adapter $name)" --samples "$samples" --json --prompt-set "$name"
done
for pair in stripes+pastel stripes+zorb pastel+zorb; do
  a=${pair%+*}; b=${pair#*+}
  stage "eval-$pair" 200 "${stylelora[@]}" evaluate --lora "$(adapter "$a")" --lora "$(adapter "$b")" --samples "$samples" \
    --json --prompt-set "$pair"
done
pack "$out/adapters"
