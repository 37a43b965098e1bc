"""Will a training config fit its hardware, and what will it cost? Compiled, not guessed.

    python -m gqa_uptrain.plan --config=configs/uptrain.py:llama2_7b_gqa8_h100x8 \\
        --model=llama2_7b --hardware=h100
    python -m gqa_uptrain.plan --config=configs/uptrain.py:llama2_7b_gqa8_v5e64 \\
        --model=llama2_7b --hardware=v5e

The planner builds the trainer's real step (train_step.build: scanned layers, remat, chunked loss,
the precision policy of the target platform) for the config's real mesh on simulated CPU devices,
with ShapeDtypeStructs only (nothing is allocated), compiles it with XLA:CPU and prints, per device:
parameters, gradients, optimizer state (from the shardings: exact), XLA:CPU's compiled figures
(arguments, temporaries: measured), and the corrections that turn XLA:CPU's figure into an
accelerator's, each with its reason and size and never folded into one total without the raw one:
  - XLA:CPU emits no reduce-scatter: a gradient reduced over fsdp is all-reduced in full and then
    sliced, so the largest all-reduce buffer of the compiled step stands where a device holds one
    shard of it;
  - attention: where the device's 'auto' runs a flash kernel (attention.select for that platform),
    the O(seq^2) float32 score buffers XLA:CPU materialises do not exist there.
Then FLOPs per token and per step (6 N + 12 L H d T, the PaLM convention: model FLOPs, so remat's
recompute sits inside the MFU), step time and tokens per day at a stated MFU, chip-hours of the
config's run (num_steps x tokens per step), whether it fits, by how much, and which knob helps.

`--model` names an architecture in ARCHITECTURES (Hugging Face config.json values) for a source not
on this machine; without it the config's init_checkpoint is inspected (no array is read), else
config.model. `--measure` (on an accelerator) also runs two steps and prints the device's measured
peak memory beside the planned figure (experiments/gpu_check.sh).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Any

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator chip: usable memory (what the runtime reports, not the marketing figure),
    dense bf16 peak FLOP/s, chips per host, and the jax platform name."""

    name: str
    platform: str
    memory_gib: float
    bf16_flops: float
    chips_per_host: int


HARDWARE: dict[str, Hardware] = {
    # nvidia-smi's totals (H100 SXM 80 GB: 81,559 MiB; H200: 143,771 MiB); dense bf16 peaks from
    # NVIDIA's datasheets (989 TFLOP/s without sparsity for both; A100: 312).
    "h100": Hardware("NVIDIA H100 SXM 80GB", "gpu", 81559 / 1024, 989e12, 8),
    "h200": Hardware("NVIDIA H200 141GB", "gpu", 143771 / 1024, 989e12, 8),
    "a100": Hardware("NVIDIA A100 SXM 80GB", "gpu", 81251 / 1024, 312e12, 8),
    # Cloud TPU docs: v5e 16 GiB HBM, 197 TFLOP/s bf16, 8 chips per host (v5litepod hosts have 4
    # or 8; 8 here); v5p 95 GiB, 459 TFLOP/s, 4 chips per host; v4 32 GiB, 275 TFLOP/s.
    "v5e": Hardware("TPU v5e", "tpu", 16.0, 197e12, 8),
    "v5p": Hardware("TPU v5p", "tpu", 95.0, 459e12, 4),
    "v4": Hardware("TPU v4", "tpu", 32.0, 275e12, 4),
}

# config.json values of models a user may plan for without having downloaded them.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama2_7b": {  # meta-llama/Llama-2-7b-hf
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "float16"},
    "llama2_13b": {  # meta-llama/Llama-2-13b-hf
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
        "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
        "num_attention_heads": 40, "num_key_value_heads": 40, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "float16"},
}

_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


class PlanError(ValueError):
    """A config the planner cannot plan."""


# ----------------------------------------------------------------------------- pure arithmetic


def shard_bytes(shapes: Any, shardings: Any) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs under matching shardings (the
    largest shard: shardings split evenly here, since a rule splits a dimension only when the
    axis divides it)."""
    import jax  # noqa: PLC0415

    total = 0
    for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(tuple(x.shape))) * x.dtype.itemsize
    return total


def all_reduce_buffers(hlo_text: str) -> list[tuple[int, tuple[str, ...]]]:
    """(bytes, result shapes) of every all-reduce in a compiled (per-device) HLO module, largest
    first. A tuple-shaped all-reduce counts as the sum of its elements."""
    out = []
    for line in hlo_text.splitlines():
        m = re.search(r"=\s*(.+?)\s+all-reduce(?:-start)?\(", line)
        if not m:
            continue
        shapes = _SHAPE.findall(m.group(1))
        total = sum(math.prod(int(d) for d in dims.split(",") if d) * _BYTES[dt]
                    for dt, dims in shapes)
        out.append((total, tuple(f"{dt}[{dims}]" for dt, dims in shapes)))
    return sorted(out, reverse=True)


def attention_temporaries(batch: int, seq: int, num_heads: int, num_kv_heads: int,
                          head_dim: int, dtype: str, implementation: str) -> int:
    """XLA:CPU's temporaries for one attention call's forward and backward at this per-device
    shape (causal, packed segments), as the CPU step runs it: the O(seq^2) buffers a flash kernel
    does not have. Compiled on one device, nothing allocated."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from gqa_uptrain import attention  # noqa: PLC0415

    def loss(q, k, v, segment_ids):
        out = attention.attention(q, k, v, mode="train", causal=True, segment_ids=segment_ids,
                                  implementation=implementation)
        return jnp.sum(out.astype(jnp.float32))

    sds = jax.ShapeDtypeStruct
    q = sds((batch, seq, num_heads, head_dim), jnp.dtype(dtype))
    kv = sds((batch, seq, num_kv_heads, head_dim), jnp.dtype(dtype))
    seg = sds((batch, seq), jnp.int32)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token, PaLM's convention: 6 N for the matmuls of the N non-embedding
    params plus the output projection, and 12 L H d T for attention (QK^T and PV, forward and
    backward, no causal discount)."""
    c = config
    attn = c.d_model * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.d_model * c.mlp_dim
    n = c.num_layers * (attn + mlp) + c.d_model * c.vocab_size  # the lm_head's matmul counts
    return 6.0 * n + 12.0 * c.num_layers * c.num_heads * c.head_dim * seq_len


@dataclasses.dataclass
class Plan:
    """Everything the report prints; bytes are per device."""

    hardware: Hardware
    mesh: dict[str, int]
    model: dict[str, Any]
    micro_batch: int
    grad_accum_steps: int
    seq_len: int
    num_steps: int
    params_bytes: int
    grads_bytes: int
    opt_bytes: int
    teacher_bytes: int
    xla_arguments: int
    xla_outputs_not_aliased: int
    xla_temporaries: int
    corrections: list[tuple[str, int]]  # (reason, bytes to add: negative = the device needs less)
    notes: list[str]
    flops_per_token: float
    compile_seconds: float
    attention_on_device: str
    remat: str
    compiled_on: str = "cpu"  # jax's backend that compiled the step (cpu: simulated devices)

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def devices_on_batch(self) -> int:
        return self.mesh["data"] * self.mesh["fsdp"]

    @property
    def raw_total(self) -> int:
        return self.xla_arguments + self.xla_outputs_not_aliased + self.xla_temporaries

    @property
    def corrected_total(self) -> int:
        return self.raw_total + sum(b for _, b in self.corrections)

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum_steps * self.seq_len

    def step_seconds(self, mfu: float) -> float:
        return (self.tokens_per_step * self.flops_per_token /
                (self.devices * self.hardware.bf16_flops * mfu))


def suggestions(plan: Plan) -> list[str]:
    """Knobs that would make a plan fit (or use the room it leaves), most effective first."""
    need = plan.corrected_total - plan.hardware.memory_gib * GIB
    per_seq = plan.xla_temporaries / max(plan.micro_batch // plan.devices_on_batch, 1)
    out = []
    if need > 0:
        if plan.remat != "full":
            out.append(f"remat='full' (now {plan.remat!r}): keeps only each block's input for the "
                       "backward pass")
        out.append("grad_accum_steps x2 (halves the micro-batch, so the activations; same tokens "
                   "per step)")
        out.append("a larger fsdp axis (params, gradients and optimizer state shrink with it)")
    elif -need > per_seq:
        out.append(f"room for about {int(-need // per_seq)} more sequence(s) per device in the "
                   "micro-batch (fewer grad_accum_steps, better utilisation)")
    return out


# ----------------------------------------------------------------------------- building a plan


def _model_config(config, model_name: str, num_layers: int = 0, pool: bool = True):
    from gqa_uptrain import hf_config, loading  # noqa: PLC0415
    from gqa_uptrain.model import ModelConfig  # noqa: PLC0415

    if model_name:
        if model_name not in ARCHITECTURES:
            raise PlanError(f"--model={model_name!r} is not one of {sorted(ARCHITECTURES)}")
        mc = hf_config.model_config_from_hf(ARCHITECTURES[model_name])
    elif config.init_checkpoint:
        if not os.path.exists(config.init_checkpoint):
            raise PlanError(f"config.init_checkpoint={config.init_checkpoint!r} is not on this "
                            f"machine: pass --model (one of {sorted(ARCHITECTURES)})")
        mc = loading.inspect(config.init_checkpoint, "config.init_checkpoint").config
    elif config.model is not None:
        mc = ModelConfig.from_dict({**config.model.to_dict(), "num_kv_heads":
                                    config.model.num_heads})
    else:
        raise PlanError("no model: set --model, config.init_checkpoint or config.model")
    if pool and config.num_kv_heads != -1:
        mc = mc.replace(num_kv_heads=config.num_kv_heads)
    return mc.replace(num_layers=num_layers) if num_layers else mc


def mesh_sizes(config, devices: int | None) -> tuple[int, int, int]:
    """The config's (data, fsdp, tensor), its one -1 resolved against `devices`."""
    from gqa_uptrain import sharding  # noqa: PLC0415

    m = config.mesh
    sizes = (m.data, m.fsdp, m.tensor)
    if -1 in sizes and devices is None:
        raise PlanError(f"config.mesh {dict(m)} has a -1: pass --devices (the chip count)")
    return sharding.mesh_shape(*sizes, devices or math.prod(sizes))


def build_plan(config, hardware: Hardware, model_name: str = "", num_layers: int = 0) -> Plan:
    """Compiles the config's train step for its mesh on the simulated devices of this process
    (jax must have at least the mesh's number of devices)."""
    import jax  # noqa: PLC0415

    from gqa_uptrain import attention, precision, sharding, train_step  # noqa: PLC0415
    from gqa_uptrain.run_config import make_schedule  # noqa: PLC0415

    mc = _model_config(config, model_name, num_layers)
    mc = precision.apply(mc, config.param_dtype, config.compute_dtype, hardware.platform)
    m = config.mesh
    data, fsdp, tensor = mesh_sizes(
        config, len(jax.devices()) if -1 in (m.data, m.fsdp, m.tensor) else None)
    devices = data * fsdp * tensor
    if devices > len(jax.devices()):
        raise PlanError(f"the mesh needs {devices} devices; this process has "
                        f"{len(jax.devices())} (run it as python -m gqa_uptrain.plan)")
    mesh = sharding.make_mesh(data, fsdp, tensor, devices=jax.devices()[:devices])
    accum = config.grad_accum_steps
    if config.batch_size % accum:
        raise PlanError(f"batch_size={config.batch_size} is not divisible by "
                        f"grad_accum_steps={accum}")
    micro, seq = config.batch_size // accum, config.data.seq_len
    if micro % (data * fsdp):
        raise PlanError(f"micro-batch {micro} is not divisible by data x fsdp = {data * fsdp}")
    if config.num_steps < 1:
        raise PlanError("config.num_steps must be set (>= 1) to plan a run's cost")
    distill = None
    if config.distill.weight:
        # The teacher: the model before pooling (distill.teacher = '', the default), its params in
        # the compute dtype (train.py's choice), not trained.
        teacher = _model_config(config, model_name, num_layers, pool=False).replace(
            param_dtype=mc.dtype, dtype=mc.dtype)
        distill = train_step.Distill(teacher_config=teacher, weight=config.distill.weight,
                                     temperature=config.distill.temperature)
    setup = train_step.build(mc, mesh, make_schedule(config, config.num_steps), config.optimizer,
                             implementation=config.attention_implementation, remat=config.remat,
                             scan_layers=config.scan_layers,
                             loss_chunk_size=config.loss_chunk_size, distill=distill)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = setup.step.lower(*setup.abstract_args(accum, micro, seq)).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    params = shard_bytes(setup.shapes, setup.param_sh)
    grads = shard_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, "float32"),
                                     setup.shapes), setup.param_sh)
    opt = shard_bytes(setup.opt_shapes, setup.opt_sh)
    teacher = 0 if distill is None else shard_bytes(setup.teacher_shapes, setup.teacher_sh)

    corrections, notes = [], []
    reductions = all_reduce_buffers(compiled.as_text())
    if reductions and fsdp * data > 1:
        biggest, shapes = reductions[0]
        shard = biggest // (data * fsdp)
        what = shapes[0] + (f" and {len(shapes) - 1} more arrays" if len(shapes) > 1 else "")
        corrections.append((f"XLA:CPU emits no reduce-scatter: its largest all-reduce "
                            f"({biggest / GIB:.2f} GiB: {what}) is a full buffer where a device "
                            f"reduce-scatters to 1/{data * fsdp}", -(biggest - shard)))
    call = attention.Call(mode="train", platform=hardware.platform, kv_layout="bskd",
                          dtype=mc.dtype, head_dim=mc.head_dim, seq_q=seq, segment_ids=True)
    on_device = attention.select(config.attention_implementation, call)
    if on_device == "pallas":
        b, t = micro // (data * fsdp), seq
        n = mc.num_heads // tensor if mc.num_heads % tensor == 0 else mc.num_heads
        k = mc.num_kv_heads // tensor if mc.num_kv_heads % tensor == 0 else mc.num_kv_heads
        measured = attention_temporaries(b, t, n, k, mc.head_dim, mc.dtype,
                                         config.attention_implementation)
        corrections.append((f"the device's 'auto' attention is {on_device!r} (flash: O(seq) "
                            "memory, taken as 0); XLA:CPU's attention forward + backward for "
                            f"one layer's per-device shape [{b}, {t}, {n} heads, {k} KV heads] "
                            f"needs {measured / GIB:.2f} GiB of temporaries (compiled alone)",
                            -measured))
    else:
        corrections.append((f"none for attention: the device's 'auto' attention is "
                            f"{on_device!r}, which materialises the scores as XLA:CPU does", 0))
    return Plan(hardware=hardware, mesh=dict(mesh.shape), model=mc.to_dict(), micro_batch=micro,
                grad_accum_steps=accum, seq_len=seq, num_steps=config.num_steps,
                params_bytes=params, grads_bytes=grads, opt_bytes=opt, teacher_bytes=teacher,
                xla_arguments=mem.argument_size_in_bytes,
                xla_outputs_not_aliased=mem.output_size_in_bytes - mem.alias_size_in_bytes,
                xla_temporaries=mem.temp_size_in_bytes, corrections=corrections, notes=notes,
                # The teacher's forward: a third of its training FLOPs (no backward).
                flops_per_token=flops_per_token(mc, seq) + (
                    flops_per_token(distill.teacher_config, seq) / 3 if distill else 0.0),
                compile_seconds=seconds,
                attention_on_device=on_device, remat=config.remat,
                compiled_on=jax.default_backend())


# ----------------------------------------------------------------------------- the report


def report(plan: Plan, mfu: float) -> str:
    g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    hw, m = plan.hardware, plan.model
    xla = f"XLA:{plan.compiled_on.upper()}"
    lines = [
        f"hardware: {plan.devices} x {hw.name} ({hw.memory_gib:.1f} GiB, "
        f"{hw.bf16_flops / 1e12:.0f} TFLOP/s bf16 each); mesh {plan.mesh}",
        f"model: {m['num_layers']} layers, d_model {m['d_model']}, {m['num_heads']} heads, "
        f"{m['num_kv_heads']} KV heads, mlp {m['mlp_dim']}, vocab {m['vocab_size']}; "
        f"{m['param_dtype']} master weights, {m['dtype']} compute, remat {plan.remat!r}",
        f"step: {plan.grad_accum_steps} micro-batch(es) of {plan.micro_batch} x {plan.seq_len} "
        f"tokens ({plan.micro_batch // plan.devices_on_batch} sequence(s) per device), "
        f"{plan.tokens_per_step:,} tokens; compiled on {plan.devices} simulated CPU devices in "
        f"{plan.compile_seconds:.1f} s",
        "",
        "per device                                   bytes",
        f"  parameters (exact, from the shardings)   {g(plan.params_bytes)}",
        f"  optimizer state (float32, exact)         {g(plan.opt_bytes)}",
        f"  gradients (float32, exact; inside XLA's temporaries) {g(plan.grads_bytes)}",
        f"  teacher (exact; inside XLA's arguments)  {g(plan.teacher_bytes)}"
        + ("" if plan.teacher_bytes else "  (none configured)"),
        f"  {xla} arguments (params, optimizer state, batch, teacher) "
        f"{g(plan.xla_arguments)}",
        f"  {xla} outputs not aliased to inputs    {g(plan.xla_outputs_not_aliased)}",
        f"  {xla} temporaries                      {g(plan.xla_temporaries)}",
        f"  {xla} total (raw, measured)            {g(plan.raw_total)}",
    ]
    for reason, b in plan.corrections:
        lines.append(f"  correction {b / GIB:+8.2f} GiB: {reason}")
    lines.append(f"  corrected total                          {g(plan.corrected_total)}")
    room = hw.memory_gib * GIB - plan.corrected_total
    raw_room = hw.memory_gib * GIB - plan.raw_total
    verdict = "FITS" if room >= 0 else "DOES NOT FIT"
    lines.append(f"  {verdict}: {room / GIB:+.2f} GiB left of {hw.memory_gib:.1f} GiB corrected "
                 f"({raw_room / GIB:+.2f} GiB by the raw figure)")
    for s in suggestions(plan):
        lines.append(f"  knob: {s}")
    for note in plan.notes:
        lines.append(f"  note: {note}")
    step_s = plan.step_seconds(mfu)
    tokens = plan.num_steps * plan.tokens_per_step
    lines += [
        "",
        f"FLOPs: {plan.flops_per_token / 1e9:.2f} GFLOP per token (6 N + 12 L H d T"
        f"{', plus the teacher forward' if plan.teacher_bytes else ''}), "
        f"{plan.flops_per_token * plan.tokens_per_step / 1e15:.1f} PFLOP per step",
        f"at MFU {mfu:.0%}: {step_s:.2f} s per step, "
        f"{plan.tokens_per_step / step_s * 86400 / 1e9:.2f}B tokens per day",
        f"the run: {plan.num_steps:,} steps = {tokens / 1e9:.1f}B tokens: "
        f"{plan.num_steps * step_s / 3600 / 24:.1f} days, "
        f"{plan.num_steps * step_s * plan.devices / 3600:,.0f} chip-hours",
    ]
    return "\n".join(lines)


def build_parser():
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="python -m gqa_uptrain.plan", description=__doc__.split("\n\n")[0],
        epilog="Any config key can be overridden as in training: --config.KEY=VALUE.")
    parser.add_argument("--config", required=True, help="config file and argument, e.g. "
                        "configs/uptrain.py:llama2_7b_gqa8_h100x8")
    parser.add_argument("--hardware", required=True, choices=sorted(HARDWARE),
                        help="the chip: usable memory, bf16 peak, platform (HARDWARE)")
    parser.add_argument("--model", default="", help=f"one of {sorted(ARCHITECTURES)} (else the "
                        "config's init_checkpoint, else config.model)")
    parser.add_argument("--num_layers", type=int, default=0, help="override the model's depth "
                        "(0: keep it), e.g. a one-GPU check of the 7B width at 4 layers")
    parser.add_argument("--devices", type=int, default=None, help="chip count, when the "
                        "config's mesh has a -1")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed "
                        "for time and cost (default 0.4)")
    parser.add_argument("--measure", action="store_true", help="on an accelerator: also run two "
                        "steps and print the measured peak memory")
    return parser


def main(argv=None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    from gqa_uptrain import cli  # noqa: PLC0415

    try:
        config = cli.load_config(args.config)
        config = _apply_overrides(config, overrides)
        hardware = HARDWARE[args.hardware]
        data, fsdp, tensor = mesh_sizes(config, args.devices)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        cli.fail(e, cli.USAGE_EXIT)
    devices = data * fsdp * tensor
    if not args.measure:  # simulated devices: before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={devices}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        plan = build_plan(config, hardware, args.model, args.num_layers)
    except ValueError as e:  # incl. PlanError, PrecisionError
        cli.fail(e)
    print(report(plan, args.mfu))
    if args.measure:
        print(measure(config, args.model, args.num_layers, plan))
    return 0


def _apply_overrides(config, overrides: list[str]):
    """--config.KEY=VALUE overrides (the trainer's syntax), typed by the existing value."""
    import ast  # noqa: PLC0415

    config = config.copy_and_resolve_references()
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ValueError(f"unknown argument {item!r} (overrides are --config.KEY=VALUE)")
        key, value = item[len("--config."):].split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ValueError(f"--config.{key}: unknown config key")
        old = node[leaf]
        node[leaf] = (value if isinstance(old, str) else
                      ast.literal_eval(value) if not isinstance(old, bool) else
                      value.lower() in ("1", "true"))
    return config


def measure(config, model_name: str, num_layers: int, plan: Plan) -> str:
    """Runs two real steps on this process's devices (an accelerator) and compares the device's
    peak memory with the plan's."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from gqa_uptrain import precision, sharding, train_step  # noqa: PLC0415
    from gqa_uptrain.run_config import make_schedule  # noqa: PLC0415

    mc = precision.apply(_model_config(config, model_name, num_layers), config.param_dtype,
                         config.compute_dtype, jax.default_backend())
    data, fsdp, tensor = (plan.mesh[a] for a in sharding.MESH_AXES)
    mesh = sharding.make_mesh(data, fsdp, tensor, devices=jax.devices()[:plan.devices])
    setup = train_step.build(mc, mesh, make_schedule(config, config.num_steps), config.optimizer,
                             implementation=config.attention_implementation, remat=config.remat,
                             scan_layers=config.scan_layers,
                             loss_chunk_size=config.loss_chunk_size)
    params = setup.scratch_params(0)
    opt_state = setup.init_opt_state(params)
    shape = (plan.grad_accum_steps, plan.micro_batch, plan.seq_len)
    batch = {k: jax.device_put(jnp.ones(shape, jnp.int32), setup.batch_sh)
             for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    with jax.set_mesh(mesh):
        for _ in range(2):
            params, opt_state, metrics = setup.step(params, opt_state, batch)
        jax.block_until_ready(metrics)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    if peak is None:
        return f"measured: {jax.devices()[0].platform} reports no peak_bytes_in_use"
    return (f"measured on {jax.devices()[0].device_kind}: peak {peak / GIB:.2f} GiB per device "
            f"vs planned {plan.corrected_total / GIB:.2f} GiB corrected, "
            f"{plan.raw_total / GIB:.2f} GiB raw (ratio {peak / plan.corrected_total:.2f})")


if __name__ == "__main__":
    sys.exit(main())
