"""Validation loss at alpha=0 of conversions of a trained tiny MHA model (merging measurement)."""
import sys, json, time, os
import numpy as np, jax, jax.numpy as jnp, optax
from flax import nnx

from gqa_uptrain import data, calibration, model as model_lib

path = sys.argv[1]; seq = int(sys.argv[2]) if len(sys.argv) > 2 else 128
calib_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 16384
params = dict(np.load(path)); config = model_lib.ModelConfig.from_dict(json.load(open(path.replace('.npz', '.npz.json')) if False else open(path + '.json')))
spec = data.DataSpec(source="stdlib", path="", val_path="", hf_name="", hf_config="", train_split="train",
                     val_split="", text_field="text", val_fraction=0.02, tokenizer="byte", seq_len=seq, cache_dir="/tmp/merge_exp/cache")
val, _ = data.load_split(spec, data.ByteTokenizer(), "validation", "/tmp/merge_exp/cache")
ids = np.arange(min(val.num_windows(seq, True), 256))
vb = {k: jnp.asarray(v) for k, v in data.window_rows(val, ids, seq).items()}

def loss(p, c):
    m = model_lib.build_model(c, p)
    f = model_lib.forward_fn(m)
    tot = cnt = 0.0
    for s in range(0, len(ids), 64):
        b = {k: v[s:s+64] for k, v in vb.items()}
        logits = f(b["inputs"], b["segment_ids"], b["positions"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"])
        tot += float((ce * b["loss_mask"]).sum()); cnt += float(b["loss_mask"].sum())
    return tot / cnt

rows = calibration.calibration_rows("byte", num_tokens=calib_tokens, seq_len=seq, seed=int(os.environ.get("CALIB_SEED", 0)))
base = loss(params, config)
print(f"MHA val loss {base:.4f}  ({int(vb['loss_mask'].sum())} tokens)", flush=True)
import os; methods = os.environ.get("METHODS", "mean,first,fit,fit_o,similar_weights+mean,similar+mean,similar+fit,similar+fit_o").split(",")
res = {}
for G in [int(g) for g in os.environ.get("GS", "4,2,1").split(",")]:
    for method in methods:
        t = time.time(); rep = {}
        p2, c2 = calibration.convert_params_calibrated(params, config, G, method, calib_tokens=rows["inputs"],
                                                       segment_ids=rows["segment_ids"], positions=rows["positions"], report=rep)
        l = loss(p2, c2); res[(G, method)] = l
        gap = res[(G, "mean")] - base
        closed = (res[(G, "mean")] - l) / gap if gap > 0 else float('nan')
        extra = ""
        fits = [x for x in rep.get("layers", []) if "objective_fit" in x]
        if fits: extra += f" Kobj {sum(x['objective_mean'] for x in fits):.3g}->{sum(x['objective_fit'] for x in fits):.3g}"
        print(f"G={G} {method:22s} loss {l:.4f}  gap-closed {closed:+.2f}  ({time.time()-t:.0f}s){extra}", flush=True)

# Keep the output (the README's table of 2026-11-28 was not archived): OUT_JSON=path writes every
# loss measured here, with the settings that produced it.
if os.environ.get("OUT_JSON"):
    with open(os.environ["OUT_JSON"], "w") as f:
        json.dump({"checkpoint": path, "model": config.to_dict(),
                   "seq_len": seq, "val_tokens": int(vb["loss_mask"].sum()),
                   "calib_tokens": calib_tokens, "calib_seed": int(os.environ.get("CALIB_SEED", 0)),
                   "mha_val_loss": base,
                   "val_loss": {f"G={G} {m}": l for (G, m), l in res.items()}}, f, indent=1)
    print(f"wrote {os.environ['OUT_JSON']}", flush=True)
