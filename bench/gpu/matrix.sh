#!/usr/bin/env bash
# One device call for issue 10's GPU goals: minilm-2stage with text and with token ids in, at a few
# process counts per stage, each configuration under its own time limit and written as soon as it is
# measured ($OUT/gpu_pipeline_<inputs>_t<tokenizers>e<encoders>.json and its logs). Run on the GPU host
# from the repository root with bench/gpu/.carry carried (prepare.sh). A dry run here:
# DEVICE=cpu DTYPE=float32 BATCH=64 REQUESTS=1000 CONFIGS="ids:1:1" bash bench/gpu/matrix.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ "${DEVICE:-cuda}" = cuda ]; then
    source bench/gpu/env.sh
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
fi
PY=${PY:-python3}
out=${OUT:-bench/results}
for config in ${CONFIGS:-ids:3:4 text:8:4 ids:3:6 text:10:5}; do
    IFS=: read -r inputs tokenizers encoders <<< "$config"
    name=gpu_pipeline_${inputs}_t${tokenizers}e${encoders}
    flag=(); [ "$inputs" = ids ] && flag=(--ids)
    echo "=== $name"
    timeout "${CONFIG_TIMEOUT_S:-150}" "$PY" bench/gpu_pipeline.py "${flag[@]}" --tokenizers "$tokenizers" \
        --encoders "$encoders" --device "${DEVICE:-cuda}" --dtype "${DTYPE:-float16}" --batch "${BATCH:-512}" \
        --requests "${REQUESTS:-200000}" --timeout-s 100 --out "$out/$name.json" --logs "$out/$name-logs" 2>&1 \
        | grep -v 'leaked\|nanobind\|skipped remainder\|See https' | tail -n 30
done
