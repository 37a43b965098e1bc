"""A run's precision policy: master weights in config.param_dtype, matmuls and activations in
config.compute_dtype; the optimizer state, the logits, the softmax and the loss always in float32.

Where it lives: in the run's config (the top-level keys param_dtype and compute_dtype), applied by
the trainer to the model of every initialisation source alike — scratch, this project's
checkpoints, Hugging Face folders and GGUF files of any dtype (train._new_run: the params are cast
when loaded, loading.load(param_dtype=...), and the ModelConfig's param_dtype/dtype fields are
replaced). A ModelConfig's two dtype fields therefore describe a saved checkpoint (what its arrays
are, how the run that wrote it computed); they are not a setting of the next run. That is why a
checkpoint written before the policy existed (meta.json holding, say, param_dtype = dtype =
bfloat16) restores unchanged: its arrays are read as stored, then cast to the policy of the run
that loads them. An fp16 Hugging Face folder (Llama-2-7b-hf ships fp16) thus trains with float32
master weights and float32 AdamW moments: fp16 Adam state breaks at once (eps = 1e-8 underflows
in fp16, so gradients of 1e-4 give updates of -inf).

fp16 compute is refused: it needs loss scaling (fp16's range loses small gradients), which this
trainer does not implement; bfloat16 has float32's range and needs none.
"""

from __future__ import annotations

from gqa_uptrain.model import ModelConfig

PARAM_DTYPES = ("float32", "bfloat16")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


class PrecisionError(ValueError):
    """A precision setting this trainer refuses."""


def compute_dtype_for(compute_dtype: str, platform: str) -> str:
    """'auto' -> bfloat16 on accelerators, float32 on CPU (where bf16 matmuls measured 2-3x slower
    than fp32: configs/pretrain.py); anything else is checked and returned."""
    if compute_dtype == "float16":
        raise PrecisionError("compute_dtype='float16' needs loss scaling, which this trainer does "
                             "not implement; use 'bfloat16' (float32's range, no scaling needed)")
    if compute_dtype not in COMPUTE_DTYPES:
        raise PrecisionError(f"compute_dtype={compute_dtype!r} is not one of {COMPUTE_DTYPES}")
    if compute_dtype == "auto":
        return "float32" if platform == "cpu" else "bfloat16"
    return compute_dtype


def check_param_dtype(param_dtype: str) -> str:
    if param_dtype == "float16":
        raise PrecisionError("param_dtype='float16': fp16 master weights lose small updates; use "
                             "'float32' (the default) or 'bfloat16'")
    if param_dtype not in PARAM_DTYPES:
        raise PrecisionError(f"param_dtype={param_dtype!r} is not one of {PARAM_DTYPES}")
    return param_dtype


def apply(model_config: ModelConfig, param_dtype: str, compute_dtype: str,
          platform: str) -> ModelConfig:
    """The model config a run trains: the source's shapes with the run's policy."""
    return model_config.replace(param_dtype=check_param_dtype(param_dtype),
                                dtype=compute_dtype_for(compute_dtype, platform))
