"""Calibrated conversions: run the MHA (or GQA) model on a few calibration rows, collect the
statistics merging.py needs, and convert a whole params dict.

  new_params, new_config = convert_params_calibrated(params, config, num_kv_heads, 'similar+fit',
                                                     calib_tokens=rows['inputs'], seed=0)

Every statistic comes from the *source* model (one forward pass per statistic kind, layer by layer,
in float32, in chunks of `batch_size` rows): layer i's statistics are those of the unconverted
layers 0..i-1 feeding it, not of already-converted ones. This needs the whole model in memory (no
streaming, unlike the plain pooling methods).

Calibration rows come from `calibration_rows` (the training data's train split: the stdlib source by
default, or local files, through data.py), a pure function of (source, tokenizer, size, seed).
"""

from __future__ import annotations

import functools
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gqa_uptrain import attention as attention_lib
from gqa_uptrain import heads, merging, pooling
from gqa_uptrain import model as model_lib
from gqa_uptrain.masking import mask_value
from gqa_uptrain.model import ModelConfig

# The validation share of the stdlib split in configs/pretrain.py and configs/uptrain.py: calibration
# reads the train split so that validation stays unseen.
DEFAULT_VAL_FRACTION = 0.02


# ----------------------------------------------------------------------------- calibration data


def calibration_rows(tokenizer: str = "byte", source: str = "stdlib", num_tokens: int = 16384,
                     seq_len: int = 256, seed: int = 0,
                     val_fraction: float = DEFAULT_VAL_FRACTION) -> dict[str, np.ndarray]:
    """Packed calibration rows from the train split: {'inputs', 'segment_ids', 'positions'}, each
    [num_tokens // seq_len, seq_len] int32.

    source: 'stdlib' (the Python standard library's source, data.py's default corpus) or
    comma-separated globs of local text/jsonl/parquet files (data.py's 'files' source, its 'text'
    field). tokenizer: 'byte' or a tokenizer.json path / folder. Documents are shuffled with `seed`
    and taken in that order until the rows are full; rows hold whole documents packed with segment
    ids, positions restarting at each document (data.window_rows).
    """
    from gqa_uptrain import data  # noqa: PLC0415 (datasets: only on this path)

    if num_tokens < seq_len:
        raise ValueError(f"calibration num_tokens={num_tokens} is less than one row of "
                         f"seq_len={seq_len}")
    is_stdlib = source == "stdlib"
    spec = data.DataSpec(source="stdlib" if is_stdlib else "files", path="" if is_stdlib else source,
                         val_path="", hf_name="", hf_config="", train_split="train", val_split="",
                         text_field="text", val_fraction=val_fraction, tokenizer=tokenizer,
                         seq_len=seq_len, cache_dir="")
    tok = data.load_tokenizer(tokenizer)
    with tempfile.TemporaryDirectory() as cache:  # datasets' cache for 'files': not kept
        documents, _ = data.load_documents(spec, "train", cache)
    num_rows = num_tokens // seq_len
    needed = num_rows * seq_len + 1
    order = np.random.default_rng(seed).permutation(len(documents))
    chosen, have = [], 0
    for i in order:
        chosen.append(documents[i])
        have += len(documents[i])  # bytes >= tokens for byte and BPE tokenizers alike: a bound
        if have >= 2 * needed:
            break
    stream = data.tokenize(chosen, tok)
    if len(stream.tokens) < needed:
        stream = data.tokenize([documents[i] for i in order], tok)
        if len(stream.tokens) < needed:
            raise ValueError(f"calibration source {source} has {len(stream.tokens)} tokens; "
                             f"{needed} are needed")
    rows = data.window_rows(stream, np.arange(num_rows), seq_len)
    return {k: rows[k] for k in ("inputs", "segment_ids", "positions")}


# ----------------------------------------------------------------------------- statistics (JAX)


def _layer_arrays(params: dict[str, Any], config: ModelConfig, layer: int) -> dict[str, jax.Array]:
    names = merging.layer_names(layer)
    c = config
    out = {k: jnp.asarray(params[names[k]], jnp.float32) for k in ("q_proj", "k_proj", "v_proj")}
    for key, count in (("q_bias", c.num_heads), ("k_bias", c.num_kv_heads),
                       ("v_bias", c.num_kv_heads)):
        out[key] = (jnp.asarray(params[names[key]], jnp.float32) if names[key] in params
                    else jnp.zeros((count, c.head_dim), jnp.float32))
    return out


def _project(h, w, b):
    return jnp.einsum("btd,dnh->btnh", h, w) + b  # [b, t, heads, head_dim], pre-RoPE


@jax.jit
def _gram_stats(h, valid, lp):
    """Gram matrices [K, K] of the layer's K and V heads' activations (pre-RoPE) over valid tokens."""
    mask = valid[..., None, None].astype(jnp.float32)
    k = _project(h, lp["k_proj"], lp["k_bias"]) * mask  # [b, t, K, H]
    v = _project(h, lp["v_proj"], lp["v_bias"]) * mask
    return jnp.einsum("btih,btjh->ij", k, k), jnp.einsum("btih,btjh->ij", v, v)


@functools.partial(jax.jit, static_argnames=("num_groups", "with_values"))
def _fit_stats(h, positions, segment_ids, valid, lp, inv_freq, num_groups, with_values=False):
    """Sums over valid tokens of the merge's statistics (merging.py's module doc).

    Returns (query_moments [K, F, 2, 2], key_moments [G, r, r, r, F, 2, 2], value_moments
    [N, r, r, H, H] or None unless with_values) for this chunk, with the layer's KV heads already
    permuted so that groups are contiguous.
    """
    q = _project(h, lp["q_proj"], lp["q_bias"])  # [b, t, N, H]
    k = _project(h, lp["k_proj"], lp["k_bias"])  # [b, t, K, H]
    batch, seq, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    s = num_heads // num_kv
    half = head_dim // 2
    # The MHA model's attention probabilities a[b, n, t, u], as attention.reference_attention
    # computes them: the grouped einsum (no K repeat) and the one mask value.
    qr = model_lib.apply_rope(q, positions, inv_freq).reshape(batch, seq, num_kv, s, head_dim)
    kr = model_lib.apply_rope(k, positions, inv_freq)  # [b, u, K, H]
    logits = jnp.einsum("btksh,bukh->bkstu", qr, kr).reshape(batch, num_heads, seq, seq)
    logits = logits * head_dim ** -0.5  # [b, N, t, u], query head n = k * s + g
    mask = attention_lib.make_mask(seq, seq, causal=True, segment_ids=segment_ids)
    mask = mask & valid[:, None, :]
    probs = jax.nn.softmax(jnp.where(mask[:, None], logits, mask_value(logits.dtype)), axis=-1)
    probs = probs * valid[:, None, :, None]  # invalid queries pay no attention  [b, N, t, u]
    # Rotated query second moments, averaged over u with the attention weights. With
    # phi = theta_j (p_u - p_t) and R = [[c, -s], [s, c]], R^T P R for P = [[p, m], [m, q]] is
    # (p+q)/2 I + ((p-q)/2 cos 2phi + m sin 2phi) diag(1, -1) + (m cos 2phi + (q-p)/2 sin 2phi) X,
    # X = [[0, 1], [1, 0]]; the attention averages of cos 2phi, sin 2phi come from angle sums.
    ang = 2.0 * positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, F]
    cos2, sin2 = jnp.cos(ang), jnp.sin(ang)
    cu = jnp.einsum("bntu,buf->bntf", probs, cos2)
    su = jnp.einsum("bntu,buf->bntf", probs, sin2)
    cos_avg = cu * cos2[:, None] + su * sin2[:, None]  # sum_u a cos(2 theta (p_u - p_t))  [b, N, t, F]
    sin_avg = su * cos2[:, None] - cu * sin2[:, None]
    qt = jnp.transpose(q, (0, 2, 1, 3))  # [b, N, t, H]
    q0, q1 = qt[..., :half], qt[..., half:]
    p, m, qq = q0 * q0, q0 * q1, q1 * q1
    weight = valid[:, None, :, None].astype(jnp.float32)
    iso = (p + qq) / 2 * weight
    diag = ((p - qq) / 2 * cos_avg + m * sin_avg) * weight
    off = (m * cos_avg + (qq - p) / 2 * sin_avg) * weight
    m00 = (iso + diag).sum((0, 2))  # [N, F]
    m11 = (iso - diag).sum((0, 2))
    m01 = off.sum((0, 2))
    qm = jnp.stack([jnp.stack([m00, m01], -1), jnp.stack([m01, m11], -1)], -2)  # [N, F, 2, 2]
    qm = qm.reshape(num_kv, s, half, 2, 2).sum(1)  # [K, F, 2, 2]: member i's query heads
    # Attention each key receives from each member's query heads, and the members' key pairs.
    w = probs.sum(2).reshape(batch, num_kv, s, seq).sum(2)  # [b, K, u]
    r = num_kv // num_groups
    w = jnp.transpose(w, (0, 2, 1)).reshape(batch, seq, num_groups, r)  # [b, u, G, r]
    pairs = jnp.stack([k[..., :half], k[..., half:]], -1)  # [b, u, K, F, 2]
    pairs = pairs.reshape(batch, seq, num_groups, r, half, 2)
    km = jnp.einsum("bugi,buglfp,bugmfq->gilmfpq", w, pairs, pairs)
    if not with_values:
        return qm, km, None
    # Attention-averaged values of every member of each head's group, as that head weighs them.
    v = _project(h, lp["v_proj"], lp["v_bias"]).reshape(batch, seq, num_groups, r, head_dim)
    probs_g = probs.reshape(batch, num_groups, num_heads // num_groups, seq, seq)
    z = jnp.einsum("bgntu,bugrh->bgntrh", probs_g, v)  # [b, G, heads of g, t, r, H]
    vm = jnp.einsum("bgntlh,bgntmk->gnlmhk", z, z).reshape(num_heads, r, r, head_dim, head_dim)
    return qm, km, vm


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _block_step(graphdef, state, x, positions, segment_ids, inv_freq):
    """One decoder block of the source model: (block output, the attention's normed input h)."""
    block = nnx.merge(graphdef, state)
    h = block.attn_norm(x)
    x = x + block.attn(h, positions, inv_freq, segment_ids, "reference")
    return x + block.mlp(block.mlp_norm(x)), h


def collect_stats(params: dict[str, Any], config: ModelConfig, rows: dict[str, np.ndarray],
                  kind: str, num_kv_heads: int | None = None, batch_size: int = 8,
                  with_values: bool = False) -> list[dict[str, np.ndarray]]:
    """Per-layer statistics of the model (params, config) on calibration rows, summed in float64
    and divided by the number of valid tokens.

    kind 'grams': {'gram_k', 'gram_v'} [K, K] (for 'similar'); kind 'fit': {'query_moments'
    [K, F, 2, 2], 'key_moments' [G, r, r, r, F, 2, 2]} for num_kv_heads = G contiguous groups, and
    with_values 'value_moments' [N, r, r, H, H] (for 'fit_o').
    rows: {'inputs' [rows, seq], optional 'segment_ids' (0 = padding), 'positions'}.
    Also returns 'num_tokens' in each layer's dict.
    """
    if kind not in ("grams", "fit"):
        raise ValueError(f"kind={kind!r} is not 'grams' or 'fit'")
    c32 = config.replace(param_dtype="float32", dtype="float32")
    # An abstract model filled with the params: no random init to compute and throw away.
    model = nnx.eval_shape(lambda: model_lib.Transformer(c32, rngs=nnx.Rngs(0)))
    model_lib.set_params(model, {k: np.asarray(v, np.float32) for k, v in params.items()})
    inv_freq = jnp.asarray(model_lib.rope_inv_freq(c32))
    layers = [_layer_arrays(params, config, i) for i in range(config.num_layers)]
    blocks = [nnx.split(block) for block in model.layers]
    tokens = np.asarray(rows["inputs"], np.int32)
    num_rows, seq = tokens.shape
    segment_ids = np.asarray(rows.get("segment_ids", np.ones_like(tokens)), np.int32)
    positions = rows.get("positions")
    if positions is None:
        positions = np.broadcast_to(np.arange(seq, dtype=np.int32), tokens.shape)
    positions = np.asarray(positions, np.int32)
    totals: list[dict[str, np.ndarray]] = [{} for _ in range(config.num_layers)]
    num_tokens = int((segment_ids > 0).sum())
    for start in range(0, num_rows, batch_size):
        sl = slice(start, start + batch_size)
        toks, seg, pos = (jnp.asarray(a[sl]) for a in (tokens, segment_ids, positions))
        valid = seg > 0
        x = model.embed[...][toks]
        for i, (graphdef, state) in enumerate(blocks):
            x, h = _block_step(graphdef, state, x, pos, seg, inv_freq)
            if kind == "grams":
                gk, gv = _gram_stats(h, valid, layers[i])
                chunk = {"gram_k": gk, "gram_v": gv}
            else:
                qm, km, vm = _fit_stats(h, pos, seg, valid, layers[i], inv_freq, num_kv_heads,
                                        with_values)
                chunk = {"query_moments": qm, "key_moments": km}
                if with_values:
                    chunk["value_moments"] = vm
            for key, value in chunk.items():
                value = np.asarray(value, np.float64)
                totals[i][key] = totals[i].get(key, 0.0) + value
    for layer in totals:
        for key in list(layer):
            layer[key] = layer[key] / max(num_tokens, 1)
        layer["num_tokens"] = num_tokens
    return totals


# ----------------------------------------------------------------------------- conversion


def _as_rows(calib_tokens, segment_ids, positions) -> dict[str, np.ndarray]:
    tokens = np.asarray(calib_tokens)
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
        raise ValueError(f"calib_tokens must be an int array [batch, seq]; got {tokens.dtype} "
                         f"{tokens.shape}")
    rows = {"inputs": tokens.astype(np.int32)}
    for key, value in (("segment_ids", segment_ids), ("positions", positions)):
        if value is not None:
            value = np.asarray(value)
            if value.shape != tokens.shape:
                raise ValueError(f"{key} has shape {value.shape}, calib_tokens {tokens.shape}")
            rows[key] = value.astype(np.int32)
    return rows


def convert_params_calibrated(params: dict[str, Any], config: ModelConfig, num_kv_heads: int,
                              method: str, *, calib_tokens: np.ndarray | None = None,
                              seed: int = 0, segment_ids: np.ndarray | None = None,
                              positions: np.ndarray | None = None, batch_size: int = 8,
                              report: dict[str, Any] | None = None
                              ) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """Converts flat params to num_kv_heads KV heads with any method of merging.METHODS.

    params/config: this project's flat params (model.py) and their ModelConfig.
    method: 'mean' | 'first' | 'random' (delegated to pooling.convert_params, calib_tokens unused),
      'fit', 'fit_o', 'similar+mean', 'similar+fit', 'similar_weights+mean', ... (merging.py's
      module doc).
    calib_tokens: [batch, seq] int token ids (e.g. calibration_rows(...)['inputs']), needed by
      'similar', 'fit' and 'fit_o'; segment_ids / positions [batch, seq] for packed rows (default:
      one document per row). With fewer than merging.MIN_CALIB_TOKENS valid tokens, 'similar'
      keeps contiguous groups and 'fit' / 'fit_o' are 'mean' (said in
      report['calibration_fallback']).
    seed: for 'random'. report: if a dict, filled with what was done per layer (permutations,
      group costs, K objective at the mean and at the fit, fallbacks).
    Returns (new params as numpy arrays in their input dtypes, config.replace(num_kv_heads=...)).
    """
    spec = merging.parse_method(method)
    report = {} if report is None else report
    report.update(method=str(spec), num_kv_heads_before=config.num_kv_heads,
                  num_kv_heads_after=num_kv_heads)
    if spec.is_pooling:
        return pooling.convert_params(params, config, num_kv_heads, spec.merge, seed)
    heads.pool_ratio(config.num_kv_heads, num_kv_heads)
    merging.check_layer_shapes(params, config)
    rows = None
    if spec.needs_calibration:
        if calib_tokens is None:
            raise ValueError(f"method={method!r} reads activations: it needs calib_tokens")
        rows = _as_rows(calib_tokens, segment_ids, positions)
        if int(rows["inputs"].max()) >= config.vocab_size or int(rows["inputs"].min()) < 0:
            raise ValueError(f"calibration token ids span {int(rows['inputs'].min())}.."
                             f"{int(rows['inputs'].max())}, outside the model's vocabulary of "
                             f"{config.vocab_size}")
        valid = (int((rows["segment_ids"] > 0).sum()) if "segment_ids" in rows
                 else rows["inputs"].size)
        report["calib_tokens"] = valid
        if valid < merging.MIN_CALIB_TOKENS:
            report["calibration_fallback"] = (
                f"{valid} calibration tokens < {merging.MIN_CALIB_TOKENS}: contiguous groups, "
                "merged by the mean")
            rows = None
    params = {k: np.asarray(v) for k, v in params.items()}
    num_groups = num_kv_heads
    layers_report = [{} for _ in range(config.num_layers)]
    report["layers"] = layers_report

    if spec.grouping != "contiguous":
        if spec.grouping == "similar_weights":
            grams = [dict(zip(("gram_k", "gram_v"), merging.weight_grams(params, i)))
                     for i in range(config.num_layers)]
        elif rows is not None:
            grams = collect_stats(params, config, rows, "grams", batch_size=batch_size)
        else:
            grams = None
        for i in range(config.num_layers):
            contiguous = np.arange(config.num_kv_heads).reshape(num_groups, -1)
            if grams is None:
                groups = contiguous
                layers_report[i]["group_cost"] = None
            else:
                dist = merging.head_distances(grams[i]["gram_k"], grams[i]["gram_v"])
                groups = merging.balanced_groups(dist, num_groups)
                layers_report[i]["group_cost"] = {
                    "contiguous": merging.group_cost(dist, contiguous),
                    "chosen": merging.group_cost(dist, groups)}
            perm = merging.groups_to_perm(groups)
            layers_report[i]["kv_perm"] = perm.tolist()
            params = merging.permute_layer(params, i, perm, config.num_heads)

    if spec.merge in pooling.METHODS or rows is None:  # rows None: too little data, 'fit' = mean
        merge = spec.merge if spec.merge in pooling.METHODS else "mean"
        return pooling.convert_params(params, config, num_kv_heads, merge, seed)

    stats = collect_stats(params, config, rows, "fit", num_kv_heads, batch_size=batch_size,
                          with_values=spec.merge == "fit_o")
    out = dict(params)
    for i in range(config.num_layers):
        merged, info = merging.fit_layer(params, i, config.num_kv_heads, num_kv_heads, stats[i])
        out.update(merged)
        layers_report[i].update(info)
    return out, config.replace(num_kv_heads=num_kv_heads)
