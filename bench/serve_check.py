"""Load an slm artifact in vLLM and generate greedily; run by bench/serve_check.sh in vLLM's own venv."""

import json
import sys
import time
from pathlib import Path


def _vllm_speed():
    """slm_cli/evaluate/vllm_speed.py by file path: vLLM's venv has no slm installed."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "slm_cli" / "evaluate" / "vllm_speed.py"
    spec = importlib.util.spec_from_file_location("vllm_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    from vllm import LLM, SamplingParams

    artifact, max_new = sys.argv[1], int(sys.argv[2])
    reason = _vllm_speed().unsupported(artifact)
    if reason:
        sys.exit(f"serve_check: {artifact}: {reason}")
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
    caveat = {"float-quantized": "on a CPU FP8 is emulated; ", "naive-quantized": "on a CPU FP8 is emulated; "}
    print(f"serve_check: OK, {new_tokens} tokens generated in {seconds:.1f} s "
          f"({caveat.get(qc.get('format'), '')}this is not a speed measurement: `slm bench bench.engine=vllm` is)")


if __name__ == "__main__":  # the guard vLLM's spawned engine process needs
    main()
