#!/usr/bin/env bash
# Wheels for `make gpu-check` on a bare GPU image (Python 3.12, torch only, no network there).
#
#   bash bench/gpu_wheels.sh [DEST]      # here, with network access; DEST defaults to .whl
#
# Downloads, for CPython 3.12 on manylinux x86_64, every package slm needs beyond torch and torch's
# own dependencies, at the exact versions installed in .venv (so the device runs what the tests
# here ran). Packages published only as source (deepspeed, antlr4-python3-runtime) are built into
# pure-Python wheels here instead. On the device, with the folder carried as .whl:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   python3 bench/gpu_check.py            # or: make gpu-check
#
# The list is what the gpu-check imports (measured: the modules a dry run loads, mapped to their
# distributions) closed over each package's required dependencies, plus pytest for the gpu tests.
# 46 wheels, ~50 MB (under the device's 64 MiB for carried folders). Left out on purpose, to stay small:
# reasoning-gym and datasets (the checks train on a .jsonl task and run tests/gpu only), matplotlib,
# tensorboard, gguf, and what torch's own wheel requires (filelock, fsspec, jinja2, networkx,
# setuptools, sympy, typing-extensions). pyyaml is only a torch extra, so it is in the list.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PY:-.venv/bin/python}

PACKAGES=(
  # training: DeepSpeed and its dependencies
  deepspeed einops hjson msgpack ninja numpy packaging psutil py-cpuinfo tqdm
  pydantic pydantic-core annotated-types typing-inspection
  # configs
  hydra-core omegaconf antlr4-python3-runtime pyyaml
  # models, tokenizers, LoRA, FP8 checkpoints
  transformers tokenizers safetensors regex huggingface-hub hf-xet httpx2 httpcore2 h11 anyio idna truststore
  typer click shellingham annotated-doc accelerate peft compressed-tensors loguru
  # terminal output
  rich markdown-it-py mdurl pygments
  # pytest -m gpu
  pytest pluggy iniconfig pytest-timeout
)

mkdir -p "$DEST"
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$DEST" "$name==$version" 2>/dev/null; then
    # source only on the registry: build a wheel here (pure Python; --no-build-isolation so that
    # deepspeed's setup.py finds .venv's torch rather than downloading one)
    echo "$name==$version: no binary wheel, building one" >&2
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$name==$version"
  fi
done
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
