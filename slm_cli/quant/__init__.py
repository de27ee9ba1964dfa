"""Quantization through compressed-tensors (FP8, INT8 W8A8, INT4 W4A16), in modules imported on
demand, since compressed-tensors and transformers take seconds to import:

* ``schemes`` — ``quantize_model(model, scheme, ignore, calib_batches)``, ``save_quantized(...)``, ``SCHEMES``
* ``checks``  — ``validate_checkpoint(out_dir, scheme)``, ``quantization_table(model_or_dir)``
* ``report``  — ``weight_error_report``, ``checkpoint_size_report``, ``fake_quant_model``, ``compare_reload``
* ``select``  — ``select_sensitive``: which tensors stay bf16 to meet a perplexity budget
* ``gptq``    — ``gptq_model``: 4-bit weight rounding chosen on calibration data
* ``smooth``  — ``smooth_model``: SmoothQuant scales folded into the norms before INT8
"""
