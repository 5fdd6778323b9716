#!/usr/bin/env bash
# Run on the GPU host, from the repository root, with bench/gpu/.carry carried (prepare.sh).
# Writes $OUT/$NAME.json (default gpu_pipeline; bench/results/ when $OUT is unset); extra arguments go to
# bench/gpu_pipeline.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/gpu/env.sh
echo "py-spy: $(command -v py-spy || echo none)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
out=${OUT:-bench/results}
python3 bench/gpu_pipeline.py --tokenizers "${TOKENIZERS:-12}" --encoders "${ENCODERS:-1}" --batch "${BATCH:-512}" \
    --requests "${REQUESTS:-60000}" --device cuda --dtype float16 --out "$out/${NAME:-gpu_pipeline}.json" "$@"
