"""Finds the attention kernels' custom calls in an exported StableHLO module and says, for each,
whether it runs inside a manual (shard_map) computation and on which operand shapes.

A custom call counts as inside when it sits in an `sdy.manual_computation` region (Shardy's form
of shard_map) or in a function every one of whose call sites is inside one (jax outlines the
kernel's custom_vjp halves into private functions called from the region). Parsed with jax's own
MLIR bindings, not by text: backend_config strings hold braces that a text scan would miscount.
"""

from __future__ import annotations

import dataclasses

# Custom-call targets of the kernels: Mosaic TPU (splash, the TPU decode kernel), Pallas' Triton
# lowering, cuDNN's fused attention (forward and backward names start with this), Mosaic GPU.
KERNEL_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "__cudnn$fmha", "mosaic_gpu")
MANUAL_OP = "sdy.manual_computation"


@dataclasses.dataclass(frozen=True)
class KernelCall:
    target: str
    function: str  # the func.func that holds it
    in_manual: bool
    operand_shapes: tuple[tuple[int, ...], ...]  # ranked tensor operands only
    result_shapes: tuple[tuple[int, ...], ...]


def _shapes(values) -> tuple[tuple[int, ...], ...]:
    from jax._src.lib.mlir import ir  # noqa: PLC0415

    out = []
    for value in values:
        try:  # a cast, not isinstance: the bindings' downcasting differs between MLIR versions
            out.append(tuple(ir.RankedTensorType(value.type).shape))
        except ValueError:  # not a ranked tensor (a token)
            pass
    return tuple(out)


def _string_attr(op, name) -> str:
    from jax._src.lib.mlir import ir  # noqa: PLC0415

    attr = op.attributes[name]
    try:
        return ir.FlatSymbolRefAttr(attr).value  # func.call's callee
    except ValueError:
        return ir.StringAttr(attr).value


def kernel_calls(mlir_text: str) -> list[KernelCall]:
    """Every kernel custom call of the module (KERNEL_TARGETS prefixes), in program order."""
    from jax._src.interpreters import mlir  # noqa: PLC0415
    from jax._src.lib.mlir import ir  # noqa: PLC0415

    with mlir.make_ir_context():
        module = ir.Module.parse(mlir_text)
        found = []  # (function, in_manual_region, op)
        call_sites = {}  # callee -> [(caller, in_manual_region)]

        def walk(op, function, in_manual):
            for region in op.regions:
                for block in region.blocks:
                    for child in block.operations:
                        name = child.operation.name
                        inner = in_manual or name == MANUAL_OP
                        if name == "func.func":
                            walk(child.operation, _string_attr(child, "sym_name"), False)
                            continue
                        if name == "func.call":
                            call_sites.setdefault(_string_attr(child, "callee"), []).append(
                                (function, in_manual))
                        elif name == "stablehlo.custom_call":
                            target = _string_attr(child, "call_target_name")
                            if target.startswith(KERNEL_TARGETS):
                                found.append((function, in_manual, child))
                        walk(child.operation, function, inner)

        walk(module.operation, None, False)
        manual_memo: dict[str, bool] = {}

        def manual_function(fn, seen=()):
            # True when every call site of fn is in a manual region or in such a function.
            if fn not in manual_memo:
                sites = call_sites.get(fn, [])
                manual_memo[fn] = bool(sites) and all(
                    inside or (caller not in seen and manual_function(caller, seen + (fn,)))
                    for caller, inside in sites)
            return manual_memo[fn]

        return [KernelCall(target=_string_attr(op, "call_target_name"), function=fn,
                           in_manual=inside or manual_function(fn),
                           operand_shapes=_shapes(op.operation.operands),
                           result_shapes=_shapes(op.operation.results))
                for fn, inside, op in found]
