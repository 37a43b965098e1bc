"""Conversions that start closer to MHA than mean pooling: which heads share a KV head (grouping by
similarity), and how a group's heads are merged (function-aware least squares). Plain numpy, like
pooling.py: the arithmetic on weights and on statistics; calibration.py runs the model to collect the
statistics and converts whole models.

Vocabulary. A layer has K = num_kv_heads "member" KV heads now (K = num_heads for MHA); each carries
s = num_heads // K query heads (query head n reads KV head n // s). Pooling to G KV heads merges r =
K // G members per group. Everything below is per layer.

Method strings (METHODS), `[GROUPING+]MERGE`:
  GROUPING  (none)           contiguous groups, the paper's: members g*r .. g*r+r-1 form group g.
            similar          groups of members whose K and V *activations* on calibration data are
                             most alike (squared distance, K and V each normalised by their mean
                             squared norm), then the layer's heads are permuted so that each group is
                             contiguous.
            similar_weights  the same with the K/V projection weights (and biases) in place of the
                             activations: needs no calibration data.
  MERGE     mean, first, random, mean_normed   pooling.py's methods, applied to the (permuted)
                                          groups.
            fit              function-aware merge (below); needs calibration data.
            fit_o            'fit', then each query head's output projection re-fitted to the
                             merged values (below); changes o_proj too.
e.g. 'mean' (the paper), 'similar+mean', 'fit', 'similar+fit', 'similar+fit_o'. 'random' ignores
the heads, so a grouping in front of it would change nothing and is refused.

Permutation. Moving KV member k to slot p moves its s query heads (q_proj, q_bias) and their rows of
o_proj with it, and k_proj/v_proj/k_bias/v_bias along the KV axis. Attention is a sum over heads, so
the model computes the same function (exactly, up to float summation order in the output projection).

Grouping search (`balanced_groups`). Cost of a group = sum over its members of the squared distance to
the group's mean = (1/r) * sum over member pairs of their squared distance. Balanced partitions are
searched from two starts — the contiguous groups, and a greedy seeding (repeatedly the unassigned head
whose r-1 nearest unassigned neighbours are closest, with those neighbours) — each refined by
best-improvement swaps of two heads between groups until no swap lowers the cost; the cheaper result
wins (ties: contiguous). Not guaranteed optimal (balanced clustering is NP-hard), but never worse than
contiguous on its own cost, and exact on well-separated clusters.

Function-aware merge ('fit'). A merged head is a combination of the group's members through maps
that act on head_dim: k_hat = sum_l A_l k_l, v_hat = sum_l B_l v_l, applied to the projection weights
and biases (the projections are linear, so merging weights merges activations). Mean pooling is
A_l = B_l = I / r.
  K: the attention logit of query head n of member i at query t and key u is q_n(t)^T R(u - t) k_i(u)
     (pre-RoPE q, k; R the RoPE rotation), and the merge should change it least. RoPE rotates each
     frequency pair (j, j + head_dim/2) by an angle theta_j * position, so A_l must commute with every
     such rotation: per pair, a 2x2 block [[a, -b], [b, a]] (a complex scalar a + ib; a scalar per
     head is the case b = 0, a constant across pairs). Then the merge commutes with RoPE and the error
     splits by frequency pair: for pair j, minimise over (a_l, b_l)_l
         sum_i  E_{u ~ w_i} [ (k_ij(u) - sum_l A_lj k_lj(u))^T  M_ij  (k_ij(u) - sum_l A_lj k_lj(u)) ]
     where M_ij = sum over member i's query heads n and query tokens t of
     sum_u a_n(t, u) R(u - t)^T q_nj(t) q_nj(t)^T R(u - t) (the attention-weighted, rotated 2x2 query
     second moment: the query statistics) and w_i(u) = sum_{n, t} a_n(t, u) is the attention member i's
     queries pay to key u (a_n: the MHA model's attention probabilities). Queries and keys are taken
     as independent, which decouples the pair sum. This is a 2r x 2r linear least-squares problem per
     pair and group, solved in closed form with a small ridge towards the mean (RIDGE, relative to
     the trace), so that directions the data do not determine stay at the mean.
  V: the output of query head n of member i changes by o_n^T (v_i - v_hat) (o_n = o_proj[n], [H, D]).
     Minimising sum_i E[(v_i - v_hat)^T P_i (v_i - v_hat)], P_i = sum_{n of i} o_n o_n^T, over every
     linear v_hat gives B_i = P_i (sum_l P_l)^-1 (the input statistics cancel); with the same ridge,
     B_i = (P_i + lam I / r)(sum_l P_l + lam I)^-1. V has no RoPE, so a full head_dim x head_dim map
     is allowed. This uses the weights only.
  O ('fit_o' only): after the V merge, query head n reads the attention-averaged merged value
     vbar_n(t) = sum_u a_n(t, u) v_hat(u) where it read vtilde_n(t) = sum_u a_n(t, u) v_i(u). Its
     output projection is re-fitted by least squares on calibration data,
     o'_n = (E[vbar vbar^T] + lam I)^-1 (E[vbar vtilde^T] + lam I) o_n (ridge towards o_n), exact
     least squares of the head's output under the MHA model's attention (the K merge's change of
     attention is not compensated). Identical members leave o_n unchanged. Query projections are
     never changed.
  Reductions: equal weights (all M_i equal and the same key weighting w_i for K; all P_i equal for
  V), or identical members, give the mean (to float64 rounding). Fallbacks to the mean: a RoPE pair
  whose K statistics are zero or not finite, a group whose output projections are zero, and the
  whole conversion ('fit' is then exactly 'mean') when there are fewer than MIN_CALIB_TOKENS
  calibration tokens (calibration.py).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING, Any

import numpy as np

from gqa_uptrain import heads, pooling

if TYPE_CHECKING:  # model.py imports jax; this module must not (convert.py validates methods with it).
    from gqa_uptrain.model import ModelConfig

GROUPINGS = ("contiguous", "similar", "similar_weights")
MERGES = pooling.METHODS + ("fit", "fit_o")
# Relative ridge of the closed-form solves: lam = RIDGE * trace(normal matrix) / its size.
RIDGE = 1e-3
# Fewer calibration tokens than this: 'fit' merges K by the mean, 'similar' keeps contiguous groups.
MIN_CALIB_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A parsed --method: grouping in GROUPINGS, merge in MERGES."""

    grouping: str
    merge: str

    def __str__(self) -> str:
        return self.merge if self.grouping == "contiguous" else f"{self.grouping}+{self.merge}"

    @property
    def is_pooling(self) -> bool:
        """Plain pooling.py methods: streamable, no calibration."""
        return self.grouping == "contiguous" and self.merge in pooling.METHODS

    @property
    def needs_calibration(self) -> bool:
        return self.grouping == "similar" or self.merge in ("fit", "fit_o")


def _all_methods() -> tuple[str, ...]:
    out = []
    for grouping, merge in itertools.product(GROUPINGS, MERGES):
        if grouping != "contiguous" and merge == "random":
            continue
        out.append(str(MethodSpec(grouping, merge)))
    return tuple(out)


METHODS = _all_methods()


def parse_method(method: str) -> MethodSpec:
    """'similar+fit' -> MethodSpec('similar', 'fit'); raises ValueError naming the valid methods."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}")
    grouping, _, merge = method.rpartition("+")
    return MethodSpec(grouping or "contiguous", merge)


# ----------------------------------------------------------------------------- permutation


def layer_names(layer: int) -> dict[str, str]:
    p = f"layers.{layer}.attn."
    return {k: p + k for k in ("q_proj", "k_proj", "v_proj", "o_proj", "q_bias", "k_bias",
                               "v_bias")}


# Head axis of each attention param: q_proj [D, N, H], k/v_proj [D, K, H], o_proj [N, H, D],
# q_bias [N, H], k/v_bias [K, H].
_QUERY_AXES = {"q_proj": 1, "q_bias": 0, "o_proj": 0}
_KV_AXES = {"k_proj": 1, "v_proj": 1, "k_bias": 0, "v_bias": 0}


def query_perm(kv_perm: np.ndarray, num_heads: int) -> np.ndarray:
    """Query-head order [num_heads] that moves each KV head's query heads with it."""
    kv_perm = np.asarray(kv_perm)
    s = num_heads // len(kv_perm)
    return (kv_perm[:, None] * s + np.arange(s)[None, :]).reshape(-1)


def permute_layer(params: dict[str, Any], layer: int, kv_perm: np.ndarray,
                  num_heads: int) -> dict[str, Any]:
    """Returns a copy of params with layer `layer`'s heads reordered: new KV head p = old kv_perm[p],
    new query heads p*s .. p*s+s-1 = old kv_perm[p]*s .. (the model's function is unchanged)."""
    kv_perm = np.asarray(kv_perm)
    if sorted(kv_perm.tolist()) != list(range(len(kv_perm))):
        raise ValueError(f"kv_perm={kv_perm.tolist()} is not a permutation")
    q_perm = query_perm(kv_perm, num_heads)
    out = dict(params)
    names = layer_names(layer)
    for key, axis in list(_QUERY_AXES.items()) + list(_KV_AXES.items()):
        if names[key] in params:
            perm = q_perm if key in _QUERY_AXES else kv_perm
            out[names[key]] = np.take(np.asarray(params[names[key]]), perm, axis=axis)
    return out


# ----------------------------------------------------------------------------- grouping


def weight_grams(params: dict[str, Any], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Gram matrices [K, K] of the layer's K and V heads as vectors (projection rows + bias)."""
    names = layer_names(layer)
    grams = []
    for proj, bias in (("k_proj", "k_bias"), ("v_proj", "v_bias")):
        w = np.asarray(params[names[proj]], np.float64)  # [D, K, H]
        if names[bias] in params:
            w = np.concatenate([w, np.asarray(params[names[bias]], np.float64)[None]], axis=0)
        heads = np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)  # [K, (D+1) * H]
        grams.append(heads @ heads.T)
    return grams[0], grams[1]


def head_distances(gram_k: np.ndarray, gram_v: np.ndarray) -> np.ndarray:
    """Squared distances [K, K] between heads from their K and V Gram matrices, K and V each divided
    by their mean squared norm (so that neither dominates by scale)."""
    out = np.zeros(gram_k.shape, np.float64)
    for gram in (gram_k, gram_v):
        gram = np.asarray(gram, np.float64)
        sq = np.diag(gram)
        scale = sq.mean()
        if not np.isfinite(scale) or scale <= 0:
            continue  # all-zero heads: no information either way
        out += np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0) / scale
    return out


def group_cost(dist: np.ndarray, groups: np.ndarray) -> float:
    """Sum over groups of the members' squared distances to their group mean. groups: [G, r]."""
    groups = np.asarray(groups)
    r = groups.shape[1]
    return float(sum(dist[np.ix_(g, g)].sum() / (2 * r) for g in groups))


def _swap_refine(dist: np.ndarray, groups: np.ndarray) -> np.ndarray:
    groups = np.array(groups)
    num_groups, r = groups.shape
    if num_groups < 2 or r < 2:
        return groups
    tol = 1e-12 * max(float(dist.max()), 1e-300)
    for _ in range(100 * dist.shape[0] ** 2):  # each pass strictly lowers the cost: terminates
        # to_group[x, g] = sum of distances from head x to the members of group g.
        to_group = dist[:, groups].sum(axis=2)  # [K, G]
        best, best_swap = -tol, None
        for g1, g2 in itertools.combinations(range(num_groups), 2):
            a, b = groups[g1], groups[g2]  # [r]
            # Cost change (times r) of swapping a[x] and b[y]:
            # (to_group[b_y, g1] - d(b_y, a_x)) - (to_group[a_x, g1])   [a_x leaves g1, b_y enters]
            # + (to_group[a_x, g2] - d(a_x, b_y)) - (to_group[b_y, g2]).
            d_ab = dist[np.ix_(a, b)]  # [r, r]
            delta = (to_group[b, g1][None, :] - to_group[a, g1][:, None]
                     + to_group[a, g2][:, None] - to_group[b, g2][None, :] - 2 * d_ab)
            x, y = np.unravel_index(np.argmin(delta), delta.shape)
            if delta[x, y] < best:
                best, best_swap = delta[x, y], (g1, x, g2, y)
        if best_swap is None:
            break
        g1, x, g2, y = best_swap
        groups[g1, x], groups[g2, y] = groups[g2, y], groups[g1, x]
    return groups


def _greedy_groups(dist: np.ndarray, num_groups: int) -> np.ndarray:
    num = dist.shape[0]
    r = num // num_groups
    free = list(range(num))
    groups = []
    while free:
        sub = dist[np.ix_(free, free)]
        best = None
        for row in range(len(free)):
            near = np.argsort(sub[row], kind="stable")[:r]  # includes itself (distance 0)
            if row not in near:
                near = np.concatenate([[row], near[:r - 1]])
            cost = sub[np.ix_(near, near)].sum()
            if best is None or cost < best[0] - 1e-12 * abs(best[0]):
                best = (cost, near)
        members = sorted(free[i] for i in best[1])
        groups.append(members)
        free = [i for i in free if i not in members]
    return np.array(groups)


def canonical_groups(groups: np.ndarray) -> np.ndarray:
    """Members sorted inside each group, groups sorted by their first member."""
    groups = np.sort(np.asarray(groups), axis=1)
    return groups[np.argsort(groups[:, 0])]


def balanced_groups(dist: np.ndarray, num_groups: int) -> np.ndarray:
    """Equal-size groups [num_groups, r] of heads with low total group cost (see the module doc).

    dist: [K, K] squared distances (head_distances). Canonical order (canonical_groups), so the
    contiguous grouping comes back as [[0..r-1], [r..2r-1], ...].
    """
    dist = np.asarray(dist, np.float64)
    num = dist.shape[0]
    heads.pool_ratio(num, num_groups)
    contiguous = np.arange(num).reshape(num_groups, -1)
    best = canonical_groups(_swap_refine(dist, contiguous))
    greedy = canonical_groups(_swap_refine(dist, _greedy_groups(dist, num_groups)))
    if group_cost(dist, greedy) < group_cost(dist, best) * (1 - 1e-9):
        best = greedy
    return best


def groups_to_perm(groups: np.ndarray) -> np.ndarray:
    """KV order [K] that makes each group contiguous (group g -> slots g*r .. g*r+r-1)."""
    return np.asarray(groups).reshape(-1)


# ----------------------------------------------------------------------------- K merge (RoPE pairs)


def to_pairs(x: np.ndarray) -> np.ndarray:
    """[..., head_dim] -> [..., head_dim/2, 2]: the rotate-half RoPE pairs (j, j + head_dim/2)."""
    half = x.shape[-1] // 2
    return np.stack([x[..., :half], x[..., half:]], axis=-1)


def from_pairs(x: np.ndarray) -> np.ndarray:
    """Inverse of to_pairs: [..., head_dim/2, 2] -> [..., head_dim]."""
    return np.concatenate([x[..., 0], x[..., 1]], axis=-1)


def mean_k_coeffs(r: int, num_pairs: int, num_groups: int = 1) -> np.ndarray:
    """The mean as K merge coefficients [num_groups, r, num_pairs, 2] ((a, b) = (1/r, 0))."""
    c = np.zeros((num_groups, r, num_pairs, 2))
    c[..., 0] = 1.0 / r
    return c


def apply_k_merge(coeffs: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Merged K vectors sum_l [[a_lj, -b_lj], [b_lj, a_lj]] members_lj, per RoPE pair j.

    coeffs: [r, head_dim/2, 2] (a, b); members: [..., r, head_dim] (keys, projection rows or biases)
    -> [..., head_dim]. Commutes with RoPE: each block is a complex scalar, as is each rotation.
    """
    m = to_pairs(np.asarray(members, np.float64))  # [..., r, F, 2]
    a, b = coeffs[..., 0], coeffs[..., 1]  # [r, F]
    x0 = (a * m[..., 0] - b * m[..., 1]).sum(axis=-2)  # [..., F]
    x1 = (b * m[..., 0] + a * m[..., 1]).sum(axis=-2)
    return from_pairs(np.stack([x0, x1], axis=-1))


_ROT = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, -1.0], [1.0, 0.0]]])  # [I, rho]: J(a,b) = aI + b rho


def k_normal_equations(query_moments: np.ndarray, key_moments: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normal equations of the K least squares (module doc), per group and RoPE pair.

    query_moments: [G, r, F, 2, 2] (M_i per member and pair); key_moments: [G, r, r, r, F, 2, 2]
    with key_moments[g, i, l, m, j] = E_{u ~ w_i}[k_lj(u) k_mj(u)^T]. Unknowns ordered (l, (a, b)).
    Returns (A [G, F, 2r, 2r], y [G, F, 2r], c0 [G, F]): objective(c) = c0 - 2 y.c + c^T A c.
    """
    M = np.asarray(query_moments, np.float64)
    S = np.asarray(key_moments, np.float64)
    G, r, F = M.shape[0], M.shape[1], M.shape[2]
    # phi_(l,e) = rho^e k_l; A[(l,e),(m,h)] = sum_i tr(M_i rho^h E_i[k_m k_l^T] rho^e^T).
    A = np.einsum("gijxy,hyp,gimljpq,exq->gjlemh", M, _ROT, S, _ROT, optimize=True)
    S_own = np.einsum("giiljpq->giljpq", S)  # E_i[k_i k_l^T]
    y = np.einsum("gijxy,giljyq,exq->gjle", M, S_own, _ROT, optimize=True)
    c0 = np.einsum("gijxy,gijyx->gj", M, _own_own(S))  # sum_i tr(M_i E_i[k_i k_i^T])
    return A.reshape(G, F, 2 * r, 2 * r), y.reshape(G, F, 2 * r), c0


def _own_own(S: np.ndarray) -> np.ndarray:
    """E_i[k_i k_i^T]: [G, r, r, r, F, 2, 2] -> [G, r, F, 2, 2]."""
    r = S.shape[1]
    return np.stack([S[:, i, i, i] for i in range(r)], axis=1)


def solve_k_merge(query_moments: np.ndarray, key_moments: np.ndarray, ridge: float = RIDGE
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Closed-form K merge coefficients [G, r, F, 2] (a, b per member and RoPE pair).

    Solves (A + lam I) c = y + lam c_mean with lam = ridge * trace(A) / 2r per group and pair; a
    pair whose A is zero or not finite gets the mean. Returns (coeffs, degenerate [G, F] bool, info)
    with info['objective_mean'] / ['objective_fit'] the summed objective at the mean and at the fit.
    """
    A, y, c0 = k_normal_equations(query_moments, key_moments)
    G, F, n = y.shape
    r = n // 2
    c_mean = mean_k_coeffs(r, F, G).transpose(0, 2, 1, 3).reshape(G, F, n)  # [G, F, (l, e)]
    trace = np.trace(A, axis1=-2, axis2=-1)  # [G, F]
    degenerate = ~(np.isfinite(trace) & (trace > 0) & np.isfinite(y).all(-1))
    lam = np.where(degenerate, 1.0, ridge * trace / n)[..., None]  # [G, F, 1]
    A_safe = np.where(degenerate[..., None, None], np.eye(n), A)
    rhs = np.where(degenerate[..., None], c_mean, y + lam * c_mean)
    sol = np.linalg.solve(A_safe + lam[..., None] * np.eye(n), rhs[..., None])[..., 0]
    sol = np.where(degenerate[..., None], c_mean, sol)
    sol = np.where(np.isfinite(sol).all(-1, keepdims=True), sol, c_mean)

    def objective(c):
        val = c0 - 2 * (y * c).sum(-1) + np.einsum("gfi,gfij,gfj->gf", c, A, c)
        return float(np.where(degenerate, 0.0, val).sum())

    info = {"objective_mean": objective(c_mean), "objective_fit": objective(sol),
            "degenerate_pairs": int(degenerate.sum())}
    coeffs = sol.reshape(G, F, r, 2).transpose(0, 2, 1, 3)  # [G, r, F, 2]
    return coeffs, degenerate, info


# ----------------------------------------------------------------------------- V merge


def solve_v_merge(o_proj: np.ndarray, num_kv_heads: int, num_groups: int,
                  ridge: float = RIDGE) -> np.ndarray:
    """Closed-form V merge maps [G, r, H, H] from the output projections (module doc).

    o_proj: [N, H, D] in the layer's (permuted) order, KV member k owning query heads k*s .. k*s+s-1.
    merged v (row vector) = sum_l v_l @ maps[g, l]. All P_i equal -> every map is I / r (the mean).
    """
    o = np.asarray(o_proj, np.float64)
    num_heads, head_dim, _ = o.shape
    r = num_kv_heads // num_groups
    o = o.reshape(num_groups, r, num_heads // num_kv_heads, head_dim, -1)  # [G, r, s, H, D]
    P = np.einsum("girhd,girkd->gihk", o, o)  # [G, r, H, H]
    total = P.sum(axis=1)  # [G, H, H]
    trace = np.trace(total, axis1=-2, axis2=-1)  # [G]
    eye = np.eye(head_dim)
    maps = np.empty_like(P)
    for g in range(num_groups):
        if not np.isfinite(trace[g]) or trace[g] <= 0:
            maps[g] = eye / r
            continue
        lam = ridge * trace[g] / head_dim
        inv = np.linalg.inv(total[g] + lam * eye)
        maps[g] = (P[g] + lam / r * eye) @ inv
    return maps


def refit_o(o_proj: np.ndarray, maps: np.ndarray, value_moments: np.ndarray,
            ridge: float = RIDGE) -> np.ndarray:
    """Output projections [N, H, D] re-fitted to merged values ('fit_o', module doc).

    o_proj: [N, H, D] (permuted order); maps: [G, r, H, H] (solve_v_merge); value_moments:
    [N, r, r, H, H], value_moments[n, l, m] = E_t[z_nl(t) z_nm(t)^T] with z_nl(t) = sum_u a_n(t, u)
    v_l(u) the attention-averaged values of member l of head n's group. A head whose merged-value
    moments are zero or not finite keeps its projection.
    """
    o = np.asarray(o_proj, np.float64)
    num_heads, head_dim, _ = o.shape
    num_groups, r = maps.shape[:2]
    heads_per_group = num_heads // num_groups
    Z = np.asarray(value_moments, np.float64)
    out = o.copy()
    eye = np.eye(head_dim)
    for n in range(num_heads):
        g, member = n // heads_per_group, (n % heads_per_group) // (heads_per_group // r)
        B = maps[g]  # [r, H, H]: vbar = sum_l B_l^T z_l
        sigma = np.einsum("lhx,lmhk,mky->xy", B, Z[n], B)  # E[vbar vbar^T]
        cross = np.einsum("lhx,lhk->xk", B, Z[n][:, member])  # E[vbar vtilde^T]
        trace = np.trace(sigma)
        if not np.isfinite(trace) or trace <= 0 or not np.isfinite(cross).all():
            continue
        lam = ridge * trace / head_dim
        out[n] = np.linalg.solve(sigma + lam * eye, (cross + lam * eye) @ o[n])
    return out


def apply_v_merge(maps: np.ndarray, members: np.ndarray) -> np.ndarray:
    """members [..., r, H] (values, projection rows or biases) -> sum_l members_l @ maps[l], [..., H]."""
    return np.einsum("...lh,lhk->...k", np.asarray(members, np.float64), maps)


# ----------------------------------------------------------------------------- whole layer / model


def _grouped_members(w: np.ndarray, axis: int, num_groups: int) -> np.ndarray:
    """[.., K (on axis), .., H] -> [G, .., r, H]: groups first, members just before head_dim."""
    front = np.moveaxis(np.asarray(w, np.float64), axis, 0)  # [K, ..., H]
    grouped = front.reshape((num_groups, -1) + front.shape[1:])  # [G, r, ..., H]
    return np.moveaxis(grouped, 1, -2)  # [G, ..., r, H]


def fit_layer(params: dict[str, Any], layer: int, num_kv_heads_now: int, num_kv_heads: int,
              stats: dict[str, np.ndarray], ridge: float = RIDGE
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """'fit' for one layer whose groups are already contiguous. stats: {'query_moments' [K, F, 2, 2],
    'key_moments' [G, r, r, r, F, 2, 2]} from calibration.collect_stats, and for 'fit_o' also
    'value_moments' [N, r, r, H, H] (then o_proj is re-fitted too).
    Returns ({name: merged k_proj/v_proj/k_bias/v_bias (and o_proj) in the input dtype}, info from
    solve_k_merge)."""
    names = layer_names(layer)
    G = num_kv_heads
    r = num_kv_heads_now // G
    qm = np.asarray(stats["query_moments"], np.float64)
    qm = qm.reshape((G, r) + qm.shape[1:])
    k_coeffs, _, info = solve_k_merge(qm, stats["key_moments"], ridge)
    v_maps = solve_v_merge(params[names["o_proj"]], num_kv_heads_now, G, ridge)
    out = {}
    for key, axis in _KV_AXES.items():
        if names[key] not in params:
            continue
        w = params[names[key]]
        members = _grouped_members(w, axis, G)  # [G, (D,) r, H]
        if key.startswith("k"):
            merged = np.stack([apply_k_merge(k_coeffs[g], members[g]) for g in range(G)])
        else:
            merged = np.stack([apply_v_merge(v_maps[g], members[g]) for g in range(G)])
        out[names[key]] = np.ascontiguousarray(
            np.moveaxis(merged, 0, axis).astype(np.asarray(w).dtype))
    if "value_moments" in stats:
        o = params[names["o_proj"]]
        out[names["o_proj"]] = refit_o(o, v_maps, stats["value_moments"], ridge).astype(
            np.asarray(o).dtype)
    return out, info


def check_layer_shapes(params: dict[str, Any], config: "ModelConfig") -> None:
    """Raises ValueError if a layer's attention params disagree with the config."""
    c = config
    for i in range(c.num_layers):
        names = layer_names(i)
        want = {"q_proj": (c.d_model, c.num_heads, c.head_dim),
                "k_proj": (c.d_model, c.num_kv_heads, c.head_dim),
                "v_proj": (c.d_model, c.num_kv_heads, c.head_dim),
                "o_proj": (c.num_heads, c.head_dim, c.d_model)}
        for key, shape in want.items():
            if names[key] not in params:
                raise ValueError(f"params have no {names[key]}")
            if tuple(np.shape(params[names[key]])) != shape:
                raise ValueError(f"{names[key]} has shape {tuple(np.shape(params[names[key]]))} but "
                                 f"the config says {shape}")
