"""FP8 quantization through compressed-tensors, in three modules (imported on demand,
since compressed-tensors and transformers take seconds to import):

* ``fp8``    — ``quantize_fp8(model, scheme, ignore, calib_batches)``, ``save_fp8(...)``, ``SCHEMES``
* ``checks`` — ``validate_fp8_checkpoint(out_dir, scheme)``, ``quantization_table(model_or_dir)``
* ``report`` — ``weight_error_report``, ``checkpoint_size_report``, ``fake_quant_model``, ``compare_reload``
"""
