#!/usr/bin/env bash
# README quickstart command 1: install, train a style adapter on datasets/toy-stripes with the embedded toy base,
# generate an image with it, and say where both are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SL=.venv/bin/stylelora
adapter=$("$SL" train datasets/toy-stripes --output outputs/toy-stripes --overwrite)
image=$("$SL" generate "stripestyle, a red circle on a white background" --lora "$adapter:1.0" --seed 1 --out outputs/quickstart.png --overwrite | tail -n 1)
echo
echo "adapter: $adapter"
echo "image:   $image"
