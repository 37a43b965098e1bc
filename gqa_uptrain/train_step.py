"""The compiled train step and the state layout it runs on, built from a model config and a mesh
alone (nothing read from disk), so the trainer and anything that only compiles the step (the
7B compile check, a memory planner) build exactly the same thing.

State layout: with scan_layers the params and the optimizer state are stacked (layer_stack.py) and
the blocks run as one jax.lax.scan; checkpoints stay per layer (StepSetup.to_disk / from_disk).
Optimizer state and the update arithmetic are float32 whatever param_dtype is (precision.py): the
gradients are cast up, AdamW runs in float32, and only the new master weights are cast back.

Distillation (Distill, build(distill=...)): the step takes a fourth argument, the teacher's params
(never differentiated, no optimizer state; sharded like params by sharding.param_shardings, stacked
when scan_layers), runs the teacher's forward on each micro-batch in the same step, and minimises
(1 - weight) nll + weight T^2 KL(teacher || student) (losses.distill_sums). weight 0 builds the plain
step (three arguments, no teacher): the same program as without distillation.
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


@dataclasses.dataclass(frozen=True)
class Distill:
    """The distillation term of the loss: (1 - weight) nll + weight temperature^2 KL(teacher ||
    student) at `temperature` (config.distill). teacher_config: the teacher's model, its params in
    the dtype they are stored in for the step (train.py: the run's compute dtype)."""

    teacher_config: ModelConfig
    weight: float
    temperature: float

    @property
    def active(self) -> bool:
        return self.weight != 0


def make_train_step(model_config: ModelConfig, tx, *, implementation: str,
                    remat: bool | str = "none", scan_layers: bool = False,
                    loss_chunk_size: int = 0, distill: Distill | None = None):
    """(params, opt_state, batch) -> (params, opt_state, metrics); not jitted. With an active
    `distill`: (params, opt_state, batch, teacher_params) -> the same, metrics holding the nll
    ('ce') and KL ('kl') means beside the weighted 'loss'.

    batch: data.BATCH_KEYS, each [grad_accum_steps, micro_batch, seq_len]. The gradient is the
    mean over all predicted tokens of the global batch: per-micro-batch sums are accumulated (in
    float32) in a scan and divided once by the total token count. opt_state is tx's state for
    float32 params (init it with init_opt_state).
    """
    if distill is not None and distill.active:
        return _make_distill_step(model_config, tx, implementation=implementation, remat=remat,
                                  scan_layers=scan_layers, loss_chunk_size=loss_chunk_size,
                                  distill=distill)
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


def _make_distill_step(model_config: ModelConfig, tx, *, implementation: str, remat: bool | str,
                       scan_layers: bool, loss_chunk_size: int, distill: Distill):
    """make_train_step's step with the distillation term (its docstring)."""
    apply = losses.make_apply(model_config, scan_layers=scan_layers)
    teacher_apply = losses.make_apply(distill.teacher_config, scan_layers=scan_layers)
    weight, temperature = float(distill.weight), float(distill.temperature)

    def loss_sum(params, teacher_params, micro):
        nll, kl = losses.distill_sums(apply, params, teacher_apply, teacher_params, micro,
                                      temperature=temperature, implementation=implementation,
                                      remat=remat, loss_chunk_size=loss_chunk_size)
        # T^2 keeps the KL term's gradient the size of the nll's as T grows (Hinton et al. 2015:
        # the soft targets' gradients scale as 1/T^2).
        return (1.0 - weight) * nll + weight * temperature ** 2 * kl, (nll, kl)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)  # params only: never the teacher's

    def train_step(params, opt_state, batch, teacher_params):
        count = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

        def micro_step(carry, micro):
            loss_acc, nll_acc, kl_acc, grad_acc = carry
            (loss, (nll, kl)), grads = grad_fn(params, teacher_params, micro)
            return (loss_acc + loss, nll_acc + nll, kl_acc + kl,
                    jax.tree.map(lambda a, g: a + g.astype(a.dtype), grad_acc, grads)), None

        zero = jnp.zeros((), jnp.float32)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (loss, nll, kl, grads), _ = jax.lax.scan(micro_step, (zero, zero, zero, zeros), batch)
        grads = jax.tree.map(lambda g: g / count, grads)
        master = _f32(params)
        updates, opt_state = tx.update(grads, opt_state, master)
        params = jax.tree.map(lambda p, m, u: (m + u).astype(p.dtype), params, master, updates)
        return params, opt_state, {"loss": loss / count, "ce": nll / count, "kl": kl / count,
                                   "grad_norm": _global_norm(grads),
                                   "param_norm": _global_norm(params)}

    return train_step


def reset_schedule_count(opt_state):
    """opt_state with the learning-rate schedule's step count at 0 and everything else (Adam's
    moments and its own count) kept: how a run that restores another run's optimizer state
    (config.init_optimizer_state) indexes its own schedule from its own step 0.

    optax's adamw keeps two counts: scale_by_adam's, for the bias correction of the moments (kept:
    the restored moments are averages over the source's steps, and with their count reset to 0 the
    first update would divide them by 1 - b1 = 0.1, a 10x jolt), and scale_by_schedule's, the step
    the schedule is read at (reset: restored, the first step would use schedule(P), P the source's
    steps, e.g. the end of a cosine, instead of this run's schedule(0)).
    """
    def is_schedule_state(x):
        return isinstance(x, optax.ScaleByScheduleState)

    def reset(x):
        return x._replace(count=jnp.zeros_like(x.count)) if is_schedule_state(x) else x

    return jax.tree.map(reset, opt_state, is_leaf=is_schedule_state)


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
    state donated; batch [grad_accum_steps, micro_batch, seq_len]. With an active distill, step
    takes the teacher's params (teacher_shapes / teacher_sh: the training layout) fourth, not
    donated; else distill is None and so are the teacher fields.
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
    distill: Distill | None = None
    teacher_shapes: dict[str, jax.ShapeDtypeStruct] | None = None
    teacher_sh: dict[str, NamedSharding] | None = None

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

    def continue_state(self, params, opt_state):
        """A checkpoint's (params, optimizer state) as restored (per layer, with disk_sh and
        disk_opt_target()) -> the first state of a run that continues it
        (config.init_optimizer_state): params in this run's param dtype, both in the training
        layout, the schedule's count reset to 0 (reset_schedule_count) and Adam's kept."""
        n, scan = self.model_config.num_layers, self.scan_layers

        def fn(p, o):
            p = {k: v.astype(self.disk_shapes[k].dtype) for k, v in p.items()}
            if scan:
                p, o = layer_stack.stack(p, n), self._stack_opt(o)
            return p, reset_schedule_count(o)

        return jax.jit(fn, out_shardings=(self.param_sh, self.opt_sh))(params, opt_state)

    def put_teacher_params(self, host: dict[str, Any]):
        """The teacher's per-layer host arrays (in teacher_shapes' dtype) -> placed, training
        layout."""
        if self.scan_layers:
            host = layer_stack.stack(dict(host), self.distill.teacher_config.num_layers)
        return sharding.put_params(host, self.teacher_sh)

    def abstract_args(self, grad_accum_steps: int, micro_batch: int, seq_len: int):
        """ShapeDtypeStructs of step's arguments, for lowering without allocating."""
        def placed(tree, shardings):
            return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                tree, shardings)

        batch = {k: jax.ShapeDtypeStruct((grad_accum_steps, micro_batch, seq_len), jnp.int32,
                                         sharding=self.batch_sh)
                 for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
        args = (placed(self.shapes, self.param_sh), placed(self.opt_shapes, self.opt_sh), batch)
        if self.distill is not None:
            args += (placed(self.teacher_shapes, self.teacher_sh),)
        return args


def build(model_config: ModelConfig, mesh: Mesh, schedule, optimizer: Any, *,
          implementation: str, remat: bool | str, scan_layers: bool,
          loss_chunk_size: int, distill: Distill | None = None) -> StepSetup:
    """The StepSetup of `model_config` on `mesh`. optimizer: config.optimizer (b1, b2, eps,
    weight_decay, clip_norm); schedule: the learning rate as a function of the step; distill:
    the distillation term (None or weight 0: none, and no teacher)."""
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
    in_shardings = (param_sh, opt_sh, batch_sh)
    teacher_shapes = teacher_sh = None
    if distill is not None and distill.active:
        t = distill.teacher_config
        if t.vocab_size != model_config.vocab_size:
            raise ValueError(f"the teacher's vocab_size={t.vocab_size} differs from the "
                             f"student's {model_config.vocab_size}: KL needs one vocabulary")
        teacher_shapes = abstract_params(t)
        if scan_layers:
            teacher_shapes = layer_stack.stack(dict(teacher_shapes), t.num_layers)
        teacher_sh = sharding.param_shardings(teacher_shapes, mesh)
        in_shardings += (teacher_sh,)
    else:
        distill = None
    step = jax.jit(
        make_train_step(model_config, tx, implementation=implementation, remat=remat,
                        scan_layers=scan_layers, loss_chunk_size=loss_chunk_size,
                        distill=distill),
        in_shardings=in_shardings, out_shardings=(param_sh, opt_sh, repl),
        donate_argnums=(0, 1))
    return StepSetup(model_config=model_config, mesh=mesh, tx=tx, scan_layers=scan_layers,
                     shapes=shapes, disk_shapes=disk_shapes, param_sh=param_sh,
                     disk_sh=sharding.param_shardings(disk_shapes, mesh),
                     opt_shapes=jax.eval_shape(tx.init, _f32(shapes)), opt_sh=opt_sh,
                     batch_sh=batch_sh, repl=repl, step=step, distill=distill,
                     teacher_shapes=teacher_shapes, teacher_sh=teacher_sh)
