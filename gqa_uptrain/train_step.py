"""The compiled train step and the state layout it runs on, built from a model config and a mesh
alone (nothing read from disk), so the trainer and anything that only compiles the step (the
7B compile check, a memory planner) build exactly the same thing.

State layout: with scan_layers the params and the optimizer state are stacked (layer_stack.py) and
the blocks run as one jax.lax.scan; checkpoints stay per layer (StepSetup.to_disk / from_disk).
Optimizer state and the update arithmetic are float32 whatever param_dtype is (precision.py): the
gradients are cast up, AdamW runs in float32, and only the new master weights are cast back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gqa_uptrain import layer_stack, losses, optim, sharding
from gqa_uptrain.model import ModelConfig, Transformer, abstract_params, get_params


def _f32(tree):
    """float32 copies of arrays, float32 ShapeDtypeStructs of ShapeDtypeStructs."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)
                        if isinstance(x, jax.ShapeDtypeStruct) else x.astype(jnp.float32), tree)


def make_train_step(model_config: ModelConfig, tx, *, implementation: str,
                    remat: bool | str = "none", scan_layers: bool = False,
                    loss_chunk_size: int = 0):
    """(params, opt_state, batch) -> (params, opt_state, metrics); not jitted.

    batch: data.BATCH_KEYS, each [grad_accum_steps, micro_batch, seq_len]. The gradient is the
    mean over all predicted tokens of the global batch: per-micro-batch sums are accumulated (in
    float32) in a scan and divided once by the total token count. opt_state is tx's state for
    float32 params (init it with init_opt_state).
    """
    apply = losses.make_apply(model_config, scan_layers=scan_layers)

    def loss_sum(params, micro):
        return losses.nll_sum(apply, params, micro, implementation=implementation, remat=remat,
                              loss_chunk_size=loss_chunk_size)[0]

    grad_fn = jax.value_and_grad(loss_sum)

    def train_step(params, opt_state, batch):
        count = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

        def micro_step(carry, micro):
            loss_acc, grad_acc = carry
            loss, grads = grad_fn(params, micro)
            return (loss_acc + loss, jax.tree.map(lambda a, g: a + g.astype(a.dtype),
                                                  grad_acc, grads)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (loss, grads), _ = jax.lax.scan(micro_step, (jnp.zeros((), jnp.float32), zeros), batch)
        grads = jax.tree.map(lambda g: g / count, grads)
        master = _f32(params)
        updates, opt_state = tx.update(grads, opt_state, master)
        params = jax.tree.map(lambda p, m, u: (m + u).astype(p.dtype), params, master, updates)
        # param_norm is also the check that the update left every parameter finite.
        return params, opt_state, {"loss": loss / count, "grad_norm": _global_norm(grads),
                                   "param_norm": _global_norm(params)}

    return train_step


def init_opt_state(tx, params):
    """tx's state for `params` in float32 (the moments of bf16 master weights are float32 too)."""
    return tx.init(_f32(params))


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class StepSetup:
    """The train step of one model on one mesh, and its state's shapes and shardings.

    shapes / param_sh: the training layout (stacked when scan_layers); disk_shapes / disk_sh: the
    checkpoint's per-layer layout. opt_shapes / opt_sh: the optimizer state (float32).
    step: jitted (params, opt_state, batch) -> (params, opt_state, metrics), params and optimizer
    state donated; batch [grad_accum_steps, micro_batch, seq_len].
    """

    model_config: ModelConfig
    mesh: Mesh
    tx: optax.GradientTransformation
    scan_layers: bool
    shapes: dict[str, jax.ShapeDtypeStruct]
    disk_shapes: dict[str, jax.ShapeDtypeStruct]
    param_sh: dict[str, NamedSharding]
    disk_sh: dict[str, NamedSharding]
    opt_shapes: Any
    opt_sh: Any
    batch_sh: NamedSharding
    repl: NamedSharding
    step: Any

    # --- layouts
    def _unstack_opt(self, opt_state):
        n = self.model_config.num_layers
        return layer_stack.map_param_dicts(opt_state, set(self.shapes),
                                           lambda d: layer_stack.unstack(d, n))

    def _stack_opt(self, opt_state):
        n = self.model_config.num_layers
        return layer_stack.map_param_dicts(opt_state, set(self.disk_shapes),
                                           lambda d: layer_stack.stack(d, n))

    def disk_opt_target(self):
        """The optimizer state as a checkpoint stores it: ShapeDtypeStructs with shardings."""
        names = set(self.disk_shapes)
        per_layer = self._unstack_opt(self.opt_shapes) if self.scan_layers else self.opt_shapes

        def place(d):
            return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.disk_sh[k])
                    for k, v in d.items()}

        return layer_stack.map_param_dicts(
            per_layer, names, place,
            other=lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.repl))

    def to_disk(self, params, opt_state):
        """(params, opt_state) in the checkpoint's per-layer layout (a copy when stacked)."""
        if not self.scan_layers:
            return params, opt_state
        n = self.model_config.num_layers
        return jax.jit(lambda p, o: (layer_stack.unstack(p, n), self._unstack_opt(o)))(
            params, opt_state)

    def from_disk(self, params, opt_state):
        """The inverse of to_disk, placed in the training shardings."""
        if not self.scan_layers:
            return params, opt_state
        n = self.model_config.num_layers
        return jax.jit(lambda p, o: (layer_stack.stack(p, n), self._stack_opt(o)),
                       out_shardings=(self.param_sh, self.opt_sh))(params, opt_state)

    # --- initial state
    def scratch_params(self, seed: int):
        """Random params from `seed` (the same values in both layouts), placed."""
        config, scan = self.model_config, self.scan_layers
        return jax.jit(lambda: get_params(Transformer(config, rngs=nnx.Rngs(seed),
                                                      scan_layers=scan)),
                       out_shardings=self.param_sh)()

    def put_host_params(self, host: dict[str, Any]):
        """Per-layer host arrays (already in param_dtype) -> placed params of the training layout."""
        if self.scan_layers:
            host = layer_stack.stack(dict(host), self.model_config.num_layers)
        return sharding.put_params(host, self.param_sh)

    def init_opt_state(self, params):
        return jax.jit(lambda p: init_opt_state(self.tx, p), out_shardings=self.opt_sh)(params)

    def abstract_args(self, grad_accum_steps: int, micro_batch: int, seq_len: int):
        """ShapeDtypeStructs of step's arguments, for lowering without allocating."""
        def placed(tree, shardings):
            return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                tree, shardings)

        batch = {k: jax.ShapeDtypeStruct((grad_accum_steps, micro_batch, seq_len), jnp.int32,
                                         sharding=self.batch_sh)
                 for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
        return placed(self.shapes, self.param_sh), placed(self.opt_shapes, self.opt_sh), batch


def build(model_config: ModelConfig, mesh: Mesh, schedule, optimizer: Any, *,
          implementation: str, remat: bool | str, scan_layers: bool,
          loss_chunk_size: int) -> StepSetup:
    """The StepSetup of `model_config` on `mesh`. optimizer: config.optimizer (b1, b2, eps,
    weight_decay, clip_norm); schedule: the learning rate as a function of the step."""
    o = optimizer
    disk_shapes = abstract_params(model_config)
    shapes = (layer_stack.stack(dict(disk_shapes), model_config.num_layers) if scan_layers
              else disk_shapes)
    # The decay mask reads each entry's per-layer rank (a stacked norm scale is [L, d], not a
    # matrix).
    tx = optim.make_optimizer(schedule, layer_stack.per_layer_shapes(shapes), b1=o.b1, b2=o.b2,
                              eps=o.eps, weight_decay=o.weight_decay, clip_norm=o.clip_norm)
    param_sh = sharding.param_shardings(shapes, mesh)
    repl = sharding.replicated(mesh)
    opt_sh = optim.opt_state_shardings(tx, _f32(shapes), param_sh, repl)
    batch_sh = NamedSharding(mesh, sharding.batch_spec(leading_axes=1))
    step = jax.jit(
        make_train_step(model_config, tx, implementation=implementation, remat=remat,
                        scan_layers=scan_layers, loss_chunk_size=loss_chunk_size),
        in_shardings=(param_sh, opt_sh, batch_sh), out_shardings=(param_sh, opt_sh, repl),
        donate_argnums=(0, 1))
    return StepSetup(model_config=model_config, mesh=mesh, tx=tx, scan_layers=scan_layers,
                     shapes=shapes, disk_shapes=disk_shapes, param_sh=param_sh,
                     disk_sh=sharding.param_shardings(disk_shapes, mesh),
                     opt_shapes=jax.eval_shape(tx.init, _f32(shapes)), opt_sh=opt_sh,
                     batch_sh=batch_sh, repl=repl, step=step)
