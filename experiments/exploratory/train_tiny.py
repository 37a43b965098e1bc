"""Trains a tiny MHA byte-level model on the stdlib train split (for the merging measurement)."""
import sys, time, json
import numpy as np, jax, jax.numpy as jnp, optax
from flax import nnx

from gqa_uptrain import data, model as model_lib

out = sys.argv[1]; steps = int(sys.argv[2]); seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
SEQ, BATCH = 128, 16
spec = data.DataSpec(source="stdlib", path="", val_path="", hf_name="", hf_config="", train_split="train",
                     val_split="", text_field="text", val_fraction=0.02, tokenizer="byte", seq_len=SEQ,
                     cache_dir="/tmp/merge_exp/cache")
tok = data.ByteTokenizer()
stream, _ = data.load_split(spec, tok, "train", "/tmp/merge_exp/cache")
nwin = stream.num_windows(SEQ, True)
config = model_lib.ModelConfig(vocab_size=257, d_model=128, num_layers=3, num_heads=8, num_kv_heads=8, mlp_dim=384)
model = model_lib.Transformer(config, rngs=nnx.Rngs(seed))
sched = optax.warmup_cosine_decay_schedule(0, 3e-3, 50, steps, 3e-4)
opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.1)), wrt=nnx.Param)

@nnx.jit
def step(model, opt, b):
    def loss_fn(m):
        logits = m(b["inputs"], segment_ids=b["segment_ids"], positions=b["positions"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"])
        mask = b["loss_mask"]
        return (ce * mask).sum() / mask.sum()
    loss, g = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, g)
    return loss
t0 = time.time()
for s in range(steps):
    ids = data.train_window_ids(seed, s, BATCH, nwin)
    b = {k: jnp.asarray(v) for k, v in data.window_rows(stream, ids, SEQ).items()}
    loss = step(model, opt, b)
    if s % 25 == 0 or s == steps - 1:
        print(s, float(loss), f"{time.time()-t0:.0f}s", flush=True)
params = {k: np.asarray(v) for k, v in model_lib.get_params(model).items()}
np.savez(out, **params)
json.dump(config.to_dict(), open(out + ".json", "w"))
