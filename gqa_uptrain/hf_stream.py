"""Hugging Face folder -> Hugging Face folder with fewer KV heads, streaming one tensor at a time.

Only the K/V tensors are decoded (and pooled, pooling.py); every other tensor is copied by byte
range (safetensors_io.py), so memory does not grow with the model. No jax, no torch: this is the
converter's path for mean / first / random between two HF folders (convert.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Any

from gqa_uptrain import heads, hf, outputs, pooling
from gqa_uptrain.safetensors_io import (DTYPE_NAMES, DTYPE_SIZES, SafetensorsWriter, read_tensor,
                                        verify_safetensors)

def convert_hf_folder(input_folder: str, output_folder: str, num_kv_heads: int,
                      method: str = "mean", seed: int = 0, *, overwrite: bool = False) -> dict[str, Any]:
    """Converts a Hugging Face folder to num_kv_heads KV heads, one tensor in memory at a time.

    Same architecture and shard layout (shards keep their names; sizes shrink only by the pooled K/V);
    config.json is edited (num_key_value_heads only, every other field kept as written); tensors are
    written header-first with {"format": "pt"} and checked with safe_open; tokenizer, generation and
    other non-weight files at the top of the folder are copied; `gqa_conversion.json` records the
    provenance. 'random' draws N(0, initializer_range) (HF's init; 0.02 when unset) per tensor name.
    The output is written to a temporary folder beside `output_folder` and renamed when complete.
    Returns a summary dict (see convert.py).
    """
    if method not in pooling.METHODS:
        raise ValueError(f"method={method!r} is not one of {pooling.METHODS}")
    config = hf.read_hf_config(input_folder)
    outputs.check_output_path(input_folder, output_folder, overwrite)
    layout = hf.hf_layout(config)
    heads.pool_ratio(layout.num_kv_heads, num_kv_heads)
    tensors, files, index_meta = hf.weight_tensors(input_folder)
    dropped = hf.check_tensors(tensors, layout)
    kv = {t.hf: t for t in layout.kv_tensors()}
    for name in tensors:
        if name in kv and tensors[name].dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name} has dtype {tensors[name].dtype}; pooling needs "
                             f"one of {sorted(DTYPE_NAMES)}")
    new_layout = dataclasses.replace(layout, num_kv_heads=num_kv_heads)
    new_shapes = new_layout.expected_shapes()
    init_std = float(config.get("initializer_range") or 0.02)

    weight_map: dict[str, str] = {}
    total_size = total_params = 0
    copied, not_copied = [], []
    with outputs.atomic_folder(output_folder, overwrite) as tmp:
        for file in files:
            infos = [t for t in tensors.values()
                     if os.path.basename(t.path) == file and t.name not in dropped]
            entries = [(t.name, t.dtype, new_shapes.get(t.name, t.shape)) for t in infos]
            if not entries:  # a shard that held only dropped buffers
                continue
            out_path = os.path.join(tmp, file)
            with SafetensorsWriter(out_path, entries, {"format": "pt"}) as writer:
                for info, (_, _, shape) in zip(infos, entries):
                    if info.name in kv:
                        w = read_tensor(info)
                        is_bias = info.name.endswith(".bias")
                        view, head_axis = layout.head_view(kv[info.name])  # [K*H, D] -> [K, H, D]
                        split = w.reshape(view)
                        pooled = pooling.pool_kv_heads(
                            split, num_kv_heads, method, head_axis=head_axis,
                            seed=pooling.tensor_seed(seed, info.name), init_std=init_std,
                            is_bias=is_bias)
                        writer.write(info.name, pooled.reshape(shape))
                        del w, split, pooled
                    else:
                        writer.copy_from(info)
                    weight_map[info.name] = file
                    total_size += math.prod(shape) * DTYPE_SIZES[info.dtype]
                    total_params += math.prod(shape)
            verify_safetensors(out_path, entries)
        if index_meta is not None:
            meta = dict(index_meta)
            meta["total_size"] = total_size
            if "total_parameters" in meta:
                meta["total_parameters"] = total_params
            outputs.write_json(os.path.join(tmp, hf.WEIGHTS_INDEX),
                        {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))})
        new_config = dict(config)
        new_config["num_key_value_heads"] = num_kv_heads
        outputs.write_json(os.path.join(tmp, hf.CONFIG_FILE), new_config)
        previous = None
        for entry in sorted(os.listdir(input_folder)):
            src = os.path.join(input_folder, entry)
            if entry == hf.PROVENANCE_FILE:  # an earlier conversion: chained, not copied
                try:
                    with open(src) as f:
                        previous = json.load(f)
                except ValueError:
                    previous = f"unreadable {hf.PROVENANCE_FILE}"
            elif entry in (hf.CONFIG_FILE, hf.WEIGHTS_INDEX) or entry in files:
                continue  # rewritten above
            elif entry.startswith(".") or hf.is_weight_file(entry) or not os.path.isfile(src):
                not_copied.append(entry)
            else:
                shutil.copy2(src, os.path.join(tmp, entry))
                copied.append(entry)
        provenance = {"converted_from": os.path.abspath(input_folder),
                      **pooling.conversion_record(method, seed, layout.num_kv_heads, num_kv_heads),
                      "dropped_tensors": dropped}
        if previous is not None:
            provenance["previous"] = previous
        outputs.write_json(os.path.join(tmp, hf.PROVENANCE_FILE), provenance)

    k_dtype = tensors[next(iter(kv))].dtype  # layer 0's k_proj.weight
    cache_dtype = hf.config_dtype(config, DTYPE_NAMES[k_dtype])
    return {
        "input_format": "hf", "output_format": "hf", "architecture": layout.architecture,
        "num_layers": layout.num_layers, "num_heads": layout.num_heads,
        "num_kv_heads_before": layout.num_kv_heads, "num_kv_heads_after": num_kv_heads,
        "head_dim": layout.head_dim, "d_model": layout.d_model, "kv_bias": layout.qkv_bias,
        "cache_dtype": cache_dtype, "method": method, "seed": seed,
        "dropped_tensors": dropped, "copied_files": copied, "not_copied": not_copied,
    }
