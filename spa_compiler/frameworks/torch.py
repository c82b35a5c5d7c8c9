"""Apply a spa pruning plan to the ``torch.nn.Module`` an ONNX model was exported from.

A plan names ONNX tensors; torch's exporters name a weight's initializer after its
``state_dict`` key when the weight reaches the graph unchanged:

- TorchScript exporter (``dynamo=False``) with ``do_constant_folding=False``: every parameter
  and buffer keeps its key (``conv1.weight``, ``bn1.running_mean``) and BatchNorm stays a node
  of its own. With constant folding on (the default) BatchNorm is folded into the conv and the
  folded weights are renamed (``onnx::Conv_29``): such a plan cannot be carried back.
- dynamo exporter (``dynamo=True``), ``optimize=False``: keys kept, BatchNorm kept.
- dynamo exporter with its default optimizer: keys kept, but BatchNorm is fused into the
  Conv / ConvTranspose / Gemm before it (a conv without bias gains ``<weight>_bias``) and
  transposed weights (Linear on 3-D inputs) become anonymous ``val_N`` constants. The fused
  BatchNorm is sliced from the module's structure (torch.fx, see ``_batchnorm_inputs``); an
  anonymous constant cannot be mapped and is refused.

spa's own preparation folds small float weights that reach their node through ``Transpose``
(at most 4096 elements) into tensors named after that node's output; pass the exported
``model`` so those names are traced back through the graph's Transpose / Identity nodes.

Only the kept channels' original values are copied, unless ``pruned`` is given: a compile
that refits weights (OBSPA compensation, on by default for ``criterion="obspa"``) changes
values the plan does not hold. With ``pruned`` (the compiled model) and ``model`` (with its
weights), every weight the export stored unchanged under a name of the module — its ONNX
values equal to the module's before slicing — takes the pruned model's values, refit included;
a refit weight the export changed (a BatchNorm fused into it, a transposed copy) cannot be
carried, and a ``SpaWarning`` names it. A pruned model in which a tensor compensation never
changes (a norm's scale, a layer that loses no input feature) differs from the plan's slice
of the module's was compiled with another plan: refused.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F  # noqa: N812 - the universal alias
from google.protobuf.message import DecodeError
from torch import nn

from spa_compiler.errors import BadInputError, SpaWarning
from spa_compiler.plan import Plan

__all__ = ["apply_plan"]

# Producers the dynamo exporter's optimizer fuses a following BatchNorm into.
_FUSING = (nn.modules.conv._ConvNd, nn.Linear)

# Hugging Face-style attention: projection children and the head attributes of their parent.
_Q_NAMES = ("q_proj", "query", "q", "q_lin")
_K_NAMES = ("k_proj", "key", "k", "k_lin")
_V_NAMES = ("v_proj", "value", "v", "v_lin")
_HEADS = ("num_heads", "num_attention_heads", "n_heads")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads")
_HEAD_DIM = ("head_dim", "attention_head_size", "d_kv")
_ALL_HEAD = ("all_head_size", "inner_dim")


@dataclass
class _Slot:
    """One tensor of the module and every (owner module, attribute) that holds it."""

    key: str  # the first state_dict-style name found for it
    tensor: torch.Tensor
    owners: list[tuple[str, nn.Module, str, bool]] = field(default_factory=list)
    # axis -> indices the plan removes there
    removed: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))


def apply_plan(
    module: nn.Module,
    plan: Plan | str | os.PathLike[str] | dict[str, Any],
    model: onnx.ModelProto | str | os.PathLike[str] | None = None,
    pruned: onnx.ModelProto | str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Slice ``module``'s parameters and buffers in place as ``plan`` prunes its ONNX export.

    ``plan`` is a ``Plan`` (``report.plan`` of ``spa_compiler.compile``), a ``--save-plan``
    JSON file or its parsed dict. ``model`` is the ONNX model the plan was made from (path or
    ModelProto, weights not needed): optional, it lets names spa derived from a weight (a
    folded Transpose) be traced back to the parameter. Module attributes follow the new
    shapes (channels, features, groups, heads) so ``repr`` and ``forward`` work; parameters
    are replaced by new ``Parameter``\\ s with the same dtype, device and ``requires_grad``.

    ``pruned``: the model the plan compiled to (path or ModelProto); its values, OBSPA's refit
    included, replace the sliced ones wherever the export stored the module's weight unchanged
    (needs ``model`` with its weights to tell; see the module's docstring).

    Raises ``BadInputError`` naming the tensor when a planned weight has no counterpart in the
    module, or when a change cannot be expressed by the module (uneven heads or groups).
    Returns ``module``.
    """
    plan = _as_plan(plan)
    graph = _OnnxGraph(model) if model is not None else None
    slots, by_key = _slots(module)
    if pruned is not None and model is None:
        raise BadInputError(
            "pruned= needs model=, the ONNX model the plan was made from (with its weights): "
            "only weights it stores as the module holds them can take the pruned values"
        )
    exported = _exported_weights(model, slots, by_key) if pruned is not None else {}
    folded_bias: dict[str, set[int]] = defaultdict(set)  # producer module -> removed channels
    for planned in plan.groups:
        channels = planned.removed
        if not channels:
            continue
        for member in planned.members:
            kind = member.get("kind")
            if kind is None:
                raise BadInputError(
                    "the plan does not say which members are weights (saved by an older spa): "
                    "apply it once with `spa compile --plan` and --save-plan it again"
                )
            if kind != "weight":
                continue  # activations have no state in the module
            removed = np.asarray(member["indices"])[channels].reshape(-1).tolist()
            target = _resolve(str(member["tensor"]), int(member["axis"]), by_key, slots, graph)
            if target is None:
                continue
            if isinstance(target, _FoldedBias):
                folded_bias[target.module].update(removed)
                continue
            key, axis = target
            slots[by_key[key]].removed[axis].update(removed)
    _derive_batchnorm(module, slots, by_key, folded_bias, graph)
    if graph is not None:
        _warn_uneven_parts(plan, graph)
    # Some refusals (uneven heads or groups) only show while attributes are updated: a
    # refused plan must leave the module as it was, not half sliced.
    snapshot = [
        (
            child,
            child.__class__,
            dict(child.__dict__),
            dict(child._parameters),
            dict(child._buffers),
        )
        for child in module.modules()
    ]
    try:
        with torch.no_grad():
            changed = _slice(slots)
            _update_modules(module, changed)
            if pruned is not None:
                _take_pruned_values(pruned, slots, by_key, exported, graph)
    except BaseException:
        for child, cls, attributes, parameters, buffers in snapshot:
            child.__class__ = cls
            child.__dict__.clear()
            child.__dict__.update(attributes)
            child._parameters.clear()
            child._parameters.update(parameters)
            child._buffers.clear()
            child._buffers.update(buffers)
        raise
    return module


# --------------------------------------------------------------------------- refit values


def _initializers(source: onnx.ModelProto | str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every initializer of a model as an array (held weights of a compile's result and
    external data included)."""
    from spa_compiler import ir

    proto = source if isinstance(source, onnx.ModelProto) else ir.read_model_proto(source)
    held = ir.held_weights(proto)
    arrays = {}
    for tensor in proto.graph.initializer:
        if ir.is_held(tensor):
            arrays[tensor.name] = np.asarray(held[tensor.name])
        elif tensor.data_location != onnx.TensorProto.EXTERNAL:
            arrays[tensor.name] = onnx.numpy_helper.to_array(tensor)
    return arrays


def _exported_weights(
    model: onnx.ModelProto | str | os.PathLike[str], slots: list[_Slot], by_key: dict[str, int]
) -> dict[str, tuple[int, np.ndarray, bool]]:
    """ONNX name -> (slot, original values, whether they are exactly the module's) for every
    initializer named after a module tensor of its shape, read before slicing."""
    exported = {}
    for name, values in _initializers(model).items():
        if name not in by_key:
            continue
        tensor = slots[by_key[name]].tensor.detach().cpu()
        if tuple(tensor.shape) != values.shape:
            continue
        module_values = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        same = np.array_equal(module_values, values.astype(module_values.dtype, copy=False))
        exported[name] = (by_key[name], values, same)
    return exported


def _sliced(values: np.ndarray, removed: dict[int, set[int]]) -> np.ndarray:
    for axis, indices in removed.items():
        values = np.delete(values, sorted(indices), axis=axis)
    return values


def _traced(
    name: str, rank: int, graph: _OnnxGraph, exported: dict[str, tuple[int, np.ndarray, bool]]
) -> tuple[str, list[int]] | None:
    """The exported module weight an initializer of the pruned model was made from, through
    the original graph's Identity and Transpose nodes (spa folds small transposed weights into
    tensors named after the Transpose), and the axis order that makes one the other:
    ``pruned = np.transpose(weight, order)``."""
    order = list(range(rank))
    for source, node in _layout_chain(name, graph):
        if source in exported:
            return source, order
        if node is not None and node.op_type == "Transpose":
            perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
            step = perm[0] if perm else list(reversed(range(rank)))
            order = [step[axis] for axis in order]
    return None


def _layout_chain(name: str, graph: _OnnxGraph):
    """``name``, then the input of each Identity or Transpose up the chain that produced it
    (16 at most), each as (tensor name, the Identity/Transpose producing it or None)."""
    for _ in range(16):
        node = graph.producers.get(name)
        if node is None or node.op_type not in ("Identity", "Transpose") or not node.input:
            yield name, None
            return
        yield name, node
        name = node.input[0]


def _take_pruned_values(
    pruned: onnx.ModelProto | str | os.PathLike[str],
    slots: list[_Slot],
    by_key: dict[str, int],
    exported: dict[str, tuple[int, np.ndarray, bool]],
    graph: _OnnxGraph,
) -> None:
    """Copy the pruned model's values into the sliced module where the export stored the
    module's weight unchanged (directly or through Transpose); warn about refit weights the
    export had changed, and about a module tensor the pruned model holds with two different
    values (a weight read twice, the reads refit apart): one tensor cannot be both. A tensor
    no compensation changes that differs from its sliced original shows a model compiled with
    another plan: refused."""
    lost = []
    carried: dict[int, tuple[str, str, np.ndarray]] = {}  # slot -> (ONNX name, key, values)
    split: dict[int, list[str]] = defaultdict(list)  # slot -> ONNX names with other values
    for name, values in _initializers(pruned).items():
        traced = _traced(name, values.ndim, graph, exported)
        if traced is None:
            continue
        key, order = traced
        index, original, same = exported[key]
        slot = slots[index]
        as_module = np.transpose(values, np.argsort(order))
        if not same:  # refit iff the pruned values are not the export's, sliced
            sliced = _sliced(original, slot.removed)
            if sliced.shape != as_module.shape or not np.array_equal(sliced, as_module):
                if not _may_be_refit(slot, slots, by_key):
                    raise _another_plan(name, key)
                lost.append(name)
            continue
        for _, owner, attribute, _ in slot.owners:
            current = getattr(owner, attribute)
            if tuple(current.shape) != as_module.shape:
                raise BadInputError(
                    f"pruned model tensor {name!r} is {list(values.shape)} but the plan makes "
                    f"the module's {key!r} {list(current.shape)}: a model compiled with "
                    "another plan?"
                )
        if index not in carried:
            carried[index] = (name, key, as_module)
        elif not np.array_equal(carried[index][2], as_module):
            split[index].append(name)
    for index, (name, key, as_module) in carried.items():
        original = _sliced(exported[key][1], slots[index].removed)
        if not _may_be_refit(slots[index], slots, by_key) and not np.array_equal(
            original, as_module
        ):
            raise _another_plan(name, key)
    for index, (_, _, as_module) in carried.items():
        if index in split:
            continue  # keeps its sliced original values; warned below
        for _, owner, attribute, _ in slots[index].owners:
            current = getattr(owner, attribute)
            current.copy_(torch.from_numpy(np.array(as_module)).to(current.dtype))
    if lost:
        warnings.warn(
            f"the pruned values of {len(lost)} weight(s) could not be carried into the module "
            f"(first: {lost[0]!r}): the export stored them changed (a BatchNorm fused in); "
            "they keep their sliced original values",
            SpaWarning,
            stacklevel=3,
        )
    if split:
        index = next(iter(split))
        name, key, _ = carried[index]
        warnings.warn(
            f"the pruned model holds {len(split)} module tensor(s) with different values in "
            f"different places (first: {key!r} as {name!r} and {split[index][0]!r}: a weight "
            "read twice, each read refit on its own), which one tensor cannot carry; they keep "
            "their sliced original values",
            SpaWarning,
            stacklevel=3,
        )


def _another_plan(name: str, key: str) -> BadInputError:
    return BadInputError(
        f"pruned model tensor {name!r} is not the module's {key!r} sliced as the plan says, "
        "and compensation does not change it: a model compiled with another plan?"
    )


def _may_be_refit(slot: _Slot, slots: list[_Slot], by_key: dict[str, int]) -> bool:
    """Whether OBSPA compensation may have changed this tensor (see
    spa_compiler.linear_layers): it refits the weights and biases of layers that read pruned
    channels, and a BatchNorm's mean after a bias-free conv. Norm scales, shifts and
    variances, PReLU slopes, and a Linear/Conv whose weight loses no input feature keep their
    values; any other tensor may be a layer's weight."""
    for prefix, owner, attribute, _ in slot.owners:
        if isinstance(owner, nn.modules.batchnorm._BatchNorm):
            if attribute not in ("weight", "bias", "running_var"):
                return True
        elif isinstance(owner, (nn.LayerNorm, nn.GroupNorm, nn.PReLU, *_rms_norm())):
            if attribute not in ("weight", "bias"):
                return True
        elif isinstance(owner, _FUSING) and attribute in ("weight", "bias"):
            weight = by_key.get(f"{prefix}.weight" if prefix else "weight")
            if weight is None:
                return True
            out_axis = 1 if _transposed(owner) else 0
            if any(indices for axis, indices in slots[weight].removed.items() if axis != out_axis):
                return True
        else:
            return True
    return False


# --------------------------------------------------------------------------- plan and names


def _as_plan(plan: Plan | str | os.PathLike[str] | dict[str, Any]) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return Plan.from_json(plan)
    if isinstance(plan, (str, os.PathLike)):
        return Plan.load(plan)
    raise BadInputError(f"a plan is a Plan, a path or a dict, not {type(plan).__name__}")


def _slots(module: nn.Module) -> tuple[list[_Slot], dict[str, int]]:
    """Every parameter and buffer, once per tensor (tied weights share a slot), with each of
    its names: the state_dict key and the dynamo exporter's older ``p_``/``b_`` placeholder
    form (``p_conv1_weight``) when that form names one tensor only."""
    slots: list[_Slot] = []
    index: dict[int, int] = {}
    by_key: dict[str, int] = {}
    placeholders: dict[str, set[int]] = defaultdict(set)
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for is_param, table in ((True, owner._parameters), (False, owner._buffers)):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                key = f"{prefix}.{name}" if prefix else name
                if id(tensor) not in index:
                    index[id(tensor)] = len(slots)
                    slots.append(_Slot(key, tensor))
                slot = index[id(tensor)]
                if (prefix, owner, name, is_param) not in slots[slot].owners:
                    slots[slot].owners.append((prefix, owner, name, is_param))
                by_key[key] = slot
                placeholders[("p_" if is_param else "b_") + key.replace(".", "_")].add(slot)
    for name, found in placeholders.items():
        if len(found) == 1 and name not in by_key:
            by_key[name] = next(iter(found))
    return slots, by_key


@dataclass(frozen=True)
class _FoldedBias:
    """``<weight>_bias``: the bias the dynamo optimizer gives a bias-free layer when it fuses
    the BatchNorm after it; its channels are that layer's output channels."""

    module: str


class _OnnxGraph:
    """Producers and initializers of the exported model, to trace spa's folded names."""

    def __init__(self, model: onnx.ModelProto | str | os.PathLike[str]) -> None:
        if not isinstance(model, onnx.ModelProto):
            try:
                model = onnx.load(os.fspath(model), load_external_data=False)
            except (OSError, ValueError, DecodeError) as error:
                raise BadInputError(f"{model}: cannot read the ONNX model ({error})") from None
        self.nodes = list(model.graph.node)
        self.producers = {out: node for node in model.graph.node for out in node.output}
        self.initializers = {t.name: t for t in model.graph.initializer}

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            tensor = self.initializers[name]
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                return None
            return onnx.numpy_helper.to_array(tensor)
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    return onnx.numpy_helper.to_array(attribute.t)
        return None


def _warn_uneven_parts(plan: Plan, graph: _OnnxGraph) -> None:
    """A forward that splits a tensor by its current size (``chunk``) splits it evenly after
    slicing; if the plan cut the parts (separate groups) by different counts, the module no
    longer computes what the pruned ONNX model does, and nothing in its parameters shows it."""
    removed: dict[str, int] = defaultdict(int)
    for planned in plan.groups:
        for member in planned.members:
            per_channel = len(member["indices"][0]) if len(member["indices"]) else 0
            removed[str(member["tensor"])] += len(planned.removed) * per_channel
    parts: dict[str, list[str]] = defaultdict(list)  # split tensor -> its parts
    for node in graph.nodes:
        if node.op_type == "Split":
            parts[node.input[0]].extend(node.output)
        elif node.op_type == "Slice":
            parts[node.input[0]].extend(node.output[:1])
    for source, outputs in sorted(parts.items()):
        counts = {removed.get(name, 0) for name in outputs}
        if len(outputs) > 1 and len(counts) > 1:
            warnings.warn(
                f"the plan removes {sorted(counts)} channels from the parts "
                f"{', '.join(outputs)} of '{source}': a forward that splits it by its size "
                "(chunk) will not match the pruned ONNX model; compare them once",
                SpaWarning,
                stacklevel=3,
            )


def _rank(name: str, by_key: dict[str, int], slots: list[_Slot], graph: _OnnxGraph) -> int | None:
    """The rank of a weight reached through Identity and Transpose nodes (they keep it)."""
    for source, _ in _layout_chain(name, graph):
        if source in by_key:
            return slots[by_key[source]].tensor.dim()
        if source in graph.initializers:
            return len(graph.initializers[source].dims)
    return None


def _resolve(
    name: str,
    axis: int,
    by_key: dict[str, int],
    slots: list[_Slot],
    graph: _OnnxGraph | None,
    depth: int = 0,
) -> tuple[str, int] | _FoldedBias | None:
    """The (state key, axis) an ONNX weight's axis is, a fused BatchNorm's bias, or None for a
    constant the module computes from shapes (nothing to slice); otherwise BadInputError."""
    if name in by_key:
        return name, axis
    if graph is not None and depth < 16:
        node = graph.producers.get(name)
        if node is not None and node.op_type == "Identity":
            return _resolve(node.input[0], axis, by_key, slots, graph, depth + 1)
        if node is not None and node.op_type == "Transpose":
            perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
            if perm:
                return _resolve(node.input[0], perm[0][axis], by_key, slots, graph, depth + 1)
            rank = _rank(node.input[0], by_key, slots, graph)
            if rank is not None:  # no perm: the axes reversed
                return _resolve(node.input[0], rank - 1 - axis, by_key, slots, graph, depth + 1)
        if node is not None and _is_fill(node, graph):
            return None
    if name.endswith("_bias") and name[: -len("_bias")] in by_key:
        slot = slots[by_key[name[: -len("_bias")]]]
        for prefix, owner, attribute, _ in slot.owners:
            if attribute == "weight" and isinstance(owner, _FUSING) and owner.bias is None:
                return _FoldedBias(prefix)
    raise BadInputError(
        f"plan tensor {name!r} (axis {axis}) is not a parameter or buffer of the module"
        + (
            ""
            if graph is not None
            else " (pass the exported ONNX model as model= to trace names spa folded)"
        )
        + "; was the plan made for another model, or exported with constant folding? "
        "(TorchScript: do_constant_folding=False; dynamo: optimize=False)"
    )


def _is_fill(node: onnx.NodeProto, graph: _OnnxGraph) -> bool:
    """A constant made by broadcasting one value to a shape (the zero bias the dynamo exporter
    gives a bias-free conv): torch computes it from shapes, so it has no state to slice."""
    if node.op_type == "ConstantOfShape":
        return True
    if node.op_type != "Expand":
        return False
    source = node.input[0]
    producer = graph.producers.get(source)
    if producer is not None and producer.op_type == "CastLike":
        source = producer.input[0]
    value = graph.constant(source)
    return value is not None and value.size == 1


# --------------------------------------------------------------------------- BatchNorm


def _batchnorm_inputs(module: nn.Module) -> dict[str, str] | None:
    """BatchNorm module name -> the Conv/ConvTranspose/Linear module whose output it reads
    directly, from a torch.fx trace; None when the module cannot be traced."""
    try:
        traced = torch.fx.symbolic_trace(module)
    except Exception:  # fx raises many types on untraceable code; the caller decides
        return None
    modules = dict(module.named_modules())
    found: dict[str, str] = {}
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(
            modules.get(node.target), nn.modules.batchnorm._BatchNorm
        ):
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), _FUSING)
        ):
            found[str(node.target)] = str(source.target)
    return found


def _output_channels(
    producer: nn.Module, prefix: str, slots: list[_Slot], by_key: dict[str, int]
) -> set[int] | None:
    """Output channels the plan removes from a Conv/ConvTranspose/Linear (None: it cannot
    tell, a grouped ConvTranspose without bias)."""
    transposed = isinstance(producer, nn.modules.conv._ConvTransposeNd)
    weight = slots[by_key[f"{prefix}.weight" if prefix else "weight"]]
    removed: set[int] | None = None
    if not transposed:
        removed = set(weight.removed.get(0, ()))
    elif producer.groups == 1:
        removed = set(weight.removed.get(1, ()))
    if producer.bias is not None:
        from_bias = set(slots[by_key[f"{prefix}.bias" if prefix else "bias"]].removed.get(0, ()))
        if removed is not None and removed != from_bias:
            raise BadInputError(f"plan removes different channels of {prefix}'s weight and bias")
        removed = from_bias
    return removed


def _derive_batchnorm(
    module: nn.Module,
    slots: list[_Slot],
    by_key: dict[str, int],
    folded_bias: dict[str, set[int]],
    graph: _OnnxGraph | None,
) -> None:
    """A BatchNorm that reads a pruned layer's output loses the same channels. Where the
    export kept it, the plan names its tensors and this only checks them; where the dynamo
    optimizer fused it into the layer, this is the only place it is sliced."""
    norms = {
        name: norm
        for name, norm in module.named_modules()
        if isinstance(norm, nn.modules.batchnorm._BatchNorm)
    }
    if not norms:
        if folded_bias:
            raise BadInputError(
                f"plan tensor {next(iter(folded_bias))}.weight_bias is a fused BatchNorm's "
                "bias, but the module has no BatchNorm"
            )
        return
    producers = dict(module.named_modules())
    inputs = _batchnorm_inputs(module)
    if inputs is None:
        _refuse_untraceable(norms, producers, slots, by_key, folded_bias, graph)
        return
    for prefix in folded_bias:
        if prefix not in inputs.values():
            raise BadInputError(
                f"plan tensor {prefix}.weight_bias is a fused BatchNorm's bias, but no "
                f"BatchNorm reads {prefix}'s output directly"
            )
    for name, source in inputs.items():
        removed = _output_channels(producers[source], source, slots, by_key)
        if removed is None:
            raise BadInputError(
                f"cannot tell which channels of grouped {source} the plan removes, to slice "
                f"the BatchNorm {name} after it"
            )
        if source in folded_bias and folded_bias[source] != removed:
            raise BadInputError(f"plan removes different channels of {source} and its bias")
        norm = producers[name]
        for attribute in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(norm, attribute, None)
            if tensor is None:
                continue
            slot = slots[by_key[f"{name}.{attribute}"]]
            planned = set(slot.removed.get(0, ()))
            if planned and planned != removed:
                raise BadInputError(
                    f"plan removes different channels of {name}.{attribute} and of {source}, "
                    "whose output it normalizes"
                )
            if removed:
                slot.removed[0].update(removed)


def _refuse_untraceable(
    norms: dict[str, nn.Module],
    producers: dict[str, nn.Module],
    slots: list[_Slot],
    by_key: dict[str, int],
    folded_bias: dict[str, set[int]],
    graph: _OnnxGraph | None,
) -> None:
    """Without a trace, which layer a BatchNorm follows is unknown: refuse wherever a fused
    BatchNorm may go unsliced (conservatively: any BatchNorm the plan does not name, as wide
    as a layer whose outputs the plan prunes, unless the ONNX model shows it was not fused)."""
    if folded_bias:
        raise BadInputError(
            f"plan tensor {next(iter(folded_bias))}.weight_bias is a fused BatchNorm's bias, "
            "and torch.fx cannot trace the module to find that BatchNorm; export with "
            "optimize=False (dynamo) or do_constant_folding=False (TorchScript)"
        )
    pruned_widths: dict[int, str] = {}
    for prefix, producer in producers.items():
        if isinstance(producer, _FUSING) and f"{prefix}.weight" in by_key:
            removed = _output_channels(producer, prefix, slots, by_key)
            if removed or removed is None:
                width = producer.weight.shape[1 if _transposed(producer) else 0]
                if _transposed(producer):
                    width *= producer.groups
                pruned_widths[int(width)] = prefix
    for name, norm in norms.items():
        keys = [f"{name}.{a}" for a in ("weight", "running_mean") if f"{name}.{a}" in by_key]
        if any(slots[by_key[k]].removed for k in keys):
            continue  # the plan names it: the export kept it
        if graph is not None and any(k in graph.initializers for k in keys):
            continue  # kept as a node of its own, in a group the plan leaves whole
        if norm.num_features in pruned_widths:
            raise BadInputError(
                f"cannot tell whether BatchNorm {name} follows the pruned "
                f"{pruned_widths[norm.num_features]}: torch.fx cannot trace the module; "
                "pass the exported model as model=, or export so BatchNorm keeps its tensors"
            )


def _transposed(layer: nn.Module) -> bool:
    return isinstance(layer, nn.modules.conv._ConvTransposeNd)


# --------------------------------------------------------------------------- slicing


def _slice(slots: list[_Slot]) -> dict[int, dict[str, dict[int, torch.Tensor]]]:
    """Replace every planned tensor by its kept slices; id(owner module) -> {attribute: {axis:
    kept indices}}, for the attribute updates."""
    changed: dict[int, dict[str, dict[int, torch.Tensor]]] = defaultdict(dict)
    for slot in slots:
        axes = {axis: removed for axis, removed in slot.removed.items() if removed}
        if not axes:
            continue
        tensor = slot.tensor
        new = tensor.detach()
        kept_by_axis: dict[int, torch.Tensor] = {}
        for axis, removed in sorted(axes.items()):
            if not 0 <= axis < tensor.dim():
                raise BadInputError(
                    f"plan prunes axis {axis} of {slot.key}, of rank {tensor.dim()}"
                )
            size = tensor.shape[axis]
            if max(removed) >= size or min(removed) < 0:
                raise BadInputError(
                    f"plan removes index {max(removed)} of {slot.key} axis {axis}, which has "
                    f"{size}: was the plan made for another model?"
                )
            kept = [i for i in range(size) if i not in removed]
            if not kept:
                raise BadInputError(f"plan removes every index of {slot.key} axis {axis}")
            kept_by_axis[axis] = torch.tensor(kept, dtype=torch.long)
            new = new.index_select(axis, kept_by_axis[axis].to(new.device))
        for _, owner, attribute, is_param in slot.owners:
            if is_param:
                owner._parameters[attribute] = nn.Parameter(new, requires_grad=tensor.requires_grad)
            else:
                owner._buffers[attribute] = new
            changed[id(owner)][attribute] = kept_by_axis
        if slot.owners and slot.owners[0][3]:  # aliases share one new Parameter
            shared = slot.owners[0][1]._parameters[slot.owners[0][2]]
            for _, owner, attribute, _ in slot.owners[1:]:
                owner._parameters[attribute] = shared
    return changed


# --------------------------------------------------------------------------- module attributes


def _groups_after(kept: torch.Tensor | None, size: int, groups: int, what: str) -> int:
    """Groups left when ``kept`` of ``size`` channels in ``groups`` equal groups stay: whole
    groups may go, and the ones left must keep equally many channels."""
    if kept is None or groups == 1:
        return groups
    per_group = size // groups
    counts = torch.bincount(kept // per_group, minlength=groups)
    present = counts[counts > 0]
    if not bool((present == present[0]).all()):
        raise BadInputError(f"plan keeps uneven channel counts in the groups of {what}")
    return int(present.numel())


def _update_modules(module: nn.Module, changed: dict[int, dict[str, Any]]) -> None:
    for name, child in module.named_modules():
        kept = changed.get(id(child))
        if kept is None and not isinstance(child, nn.MultiheadAttention):
            continue
        if isinstance(child, nn.MultiheadAttention):
            _update_attention(name, child, kept or {}, changed)
        elif isinstance(child, nn.modules.conv._ConvNd):
            _update_conv(name, child, kept)
        elif isinstance(child, nn.Linear):
            child.out_features, child.in_features = child.weight.shape
        elif isinstance(child, nn.Bilinear):
            raise BadInputError(f"pruning Bilinear layer {name} is not supported")
        elif isinstance(child, nn.modules.batchnorm._NormBase):
            ref = child.running_mean if child.running_mean is not None else child.weight
            child.num_features = int(ref.shape[0])
        elif isinstance(child, nn.GroupNorm):
            weight_kept = kept.get("weight", {}).get(0)
            child.num_groups = _groups_after(
                weight_kept, child.num_channels, child.num_groups, name
            )
            child.num_channels = int(child.weight.shape[0])
        elif isinstance(child, (nn.LayerNorm, *_rms_norm())):
            if child.weight is not None:
                child.normalized_shape = tuple(child.weight.shape)
        elif isinstance(child, nn.Embedding):
            _update_embedding(name, child, kept)
        elif isinstance(child, nn.PReLU):
            child.num_parameters = int(child.weight.numel())
    _update_hf_attention(module, changed)


def _rms_norm() -> tuple[type, ...]:
    return (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()


def _update_conv(name: str, conv: nn.modules.conv._ConvNd, kept: dict[str, Any]) -> None:
    weight = conv.weight
    rows = kept.get("weight", {}).get(0)
    if conv.transposed:  # weight [in, out / groups, *kernel]
        conv.groups = _groups_after(rows, conv.in_channels, conv.groups, name)
        conv.in_channels = int(weight.shape[0])
        conv.out_channels = int(weight.shape[1]) * conv.groups
    else:  # weight [out, in / groups, *kernel]
        conv.groups = _groups_after(rows, conv.out_channels, conv.groups, name)
        conv.out_channels = int(weight.shape[0])
        conv.in_channels = int(weight.shape[1]) * conv.groups


def _update_embedding(name: str, embedding: nn.Embedding, kept: dict[str, Any]) -> None:
    rows = kept.get("weight", {}).get(0)
    if rows is not None and embedding.padding_idx is not None:
        where = (rows == embedding.padding_idx).nonzero()
        if where.numel() == 0:
            raise BadInputError(f"plan removes the padding index of embedding {name}")
        embedding.padding_idx = int(where[0, 0])
    embedding.num_embeddings, embedding.embedding_dim = embedding.weight.shape


def _heads_kept(
    kept: torch.Tensor | None, heads: int, head_dim: int, what: str
) -> tuple[list[int], int]:
    """(the heads that keep channels, channels each keeps) of a projection's output rows."""
    if kept is None:
        return list(range(heads)), head_dim
    counts = torch.bincount(kept // head_dim, minlength=heads)
    present = [h for h in range(heads) if counts[h] > 0]
    if any(int(counts[h]) != int(counts[present[0]]) for h in present):
        raise BadInputError(f"plan keeps uneven channel counts in the heads of {what}")
    return present, int(counts[present[0]])


def _update_attention(
    name: str, attention: nn.MultiheadAttention, kept: dict[str, Any], changed: dict
) -> None:
    """nn.MultiheadAttention packs q, k, v in ``in_proj_weight`` [3E, E]. Its forward assumes
    the projections are E wide; once heads (or head dims) go they are narrower than the model
    dimension, so the module becomes ``PrunedMultiheadAttention``, the same computation with
    the widths and the original scale kept apart."""
    out_kept = changed.get(id(attention.out_proj), {})
    if not kept and not out_kept:
        return
    if not attention._qkv_same_embed_dim or attention.bias_k is not None:
        raise BadInputError(
            f"pruning {name}: only MultiheadAttention with packed q/k/v projections and "
            "without add_bias_kv is supported"
        )
    if attention.add_zero_attn:
        raise BadInputError(f"pruning {name}: add_zero_attn is not supported")
    if isinstance(attention, PrunedMultiheadAttention):
        raise BadInputError(f"{name} was pruned already; apply a plan to the original module")
    heads, head_dim, embed = attention.num_heads, attention.head_dim, attention.embed_dim
    rows = kept.get("in_proj_weight", {}).get(0)
    parts = [None, None, None]
    if rows is not None:
        parts = [rows[(rows >= i * embed) & (rows < (i + 1) * embed)] - i * embed for i in range(3)]
    q_heads, q_dim = _heads_kept(parts[0], heads, head_dim, f"{name} (query)")
    k_heads, k_dim = _heads_kept(parts[1], heads, head_dim, f"{name} (key)")
    v_heads, v_dim = _heads_kept(parts[2], heads, head_dim, f"{name} (value)")
    if not q_heads == k_heads == v_heads or q_dim != k_dim:
        raise BadInputError(f"plan keeps different heads of {name}'s query, key and value")
    attention.__class__ = PrunedMultiheadAttention
    attention.scale = 1.0 / math.sqrt(head_dim)  # what the exported graph multiplies by
    attention.num_heads = len(q_heads)
    attention.head_dim = q_dim
    attention.v_head_dim = v_dim
    attention.embed_dim = attention.kdim = attention.vdim = int(attention.in_proj_weight.shape[1])


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose q/k and v projections are ``num_heads * head_dim`` and
    ``num_heads * v_head_dim`` wide instead of ``embed_dim``, scaled by the original head
    size's ``scale``; what ``apply_plan`` turns a head-pruned MultiheadAttention into."""

    scale: float
    v_head_dim: int

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"v_head_dim={self.v_head_dim}, batch_first={self.batch_first}"
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (
                t.unsqueeze(1 - int(self.batch_first)) for t in (query, key, value)
            )
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        length, batch, _ = query.shape
        source = key.shape[0]
        heads, qk, vd = self.num_heads, self.head_dim, self.v_head_dim
        weight, bias = self.in_proj_weight, self.in_proj_bias
        bounds = [0, heads * qk, 2 * heads * qk, 2 * heads * qk + heads * vd]
        projected = []
        for i, (x, size, width) in enumerate(
            ((query, length, qk), (key, source, qk), (value, source, vd))
        ):
            b = None if bias is None else bias[bounds[i] : bounds[i + 1]]
            y = F.linear(x, weight[bounds[i] : bounds[i + 1]], b)
            projected.append(y.reshape(size, batch * heads, width).transpose(0, 1))
        q, k, v = projected
        scores = torch.bmm(q * self.scale, k.transpose(1, 2))  # [batch * heads, L, S]
        mask = _additive_mask(
            attn_mask, key_padding_mask, is_causal, length, source, batch, heads, scores
        )
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(length, batch, heads * vd)
        out = self.out_proj(out)
        if self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1 - int(self.batch_first))
        if not need_weights:
            return out, None
        weights = weights.reshape(batch, heads, length, source)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            weights = weights.squeeze(0)
        return out, weights


def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    length: int,
    source: int,
    batch: int,
    heads: int,
    like: torch.Tensor,
) -> torch.Tensor | None:
    """The masks as one float tensor added to the scores ([L, S] or [batch * heads, L, S])."""

    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros_like(mask, dtype=like.dtype).masked_fill(mask, float("-inf"))
        return mask.to(like.dtype)

    total = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=like.device).triu(1)
    if attn_mask is not None:
        total = additive(attn_mask)
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).reshape(batch, 1, 1, source)
        padding = padding.expand(batch, heads, 1, source).reshape(batch * heads, 1, source)
        total = padding if total is None else total + padding
    return total


def _first_attribute(owner: nn.Module, names: Iterable[str]) -> str | None:
    return next((n for n in names if isinstance(getattr(owner, n, None), int)), None)


def _update_hf_attention(module: nn.Module, changed: dict[int, dict[str, Any]]) -> None:
    """Separate q/k/v Linear children under a parent that stores its head counts
    (``num_heads``, ``head_dim``, ``all_head_size`` and the like, Hugging Face style): the
    counts follow the projections' new widths, as whole heads (GQA's key/value heads too)."""
    for name, parent in module.named_modules():
        heads_name = _first_attribute(parent, _HEADS)
        if heads_name is None:
            continue
        children = dict(parent.named_children())
        q = next((children[n] for n in _Q_NAMES if isinstance(children.get(n), nn.Linear)), None)
        k = next((children[n] for n in _K_NAMES if isinstance(children.get(n), nn.Linear)), None)
        v = next((children[n] for n in _V_NAMES if isinstance(children.get(n), nn.Linear)), None)
        if q is None or id(q) not in changed or 0 not in changed[id(q)].get("weight", {}):
            continue
        heads = getattr(parent, heads_name)
        dim_name = _first_attribute(parent, _HEAD_DIM)
        q_rows = changed[id(q)]["weight"][0]
        head_dim = getattr(parent, dim_name) if dim_name else None
        if head_dim is None:  # the original width is gone: nothing left to derive it from
            raise BadInputError(
                f"pruning heads of {name}: it has {heads_name} but no head size attribute "
                f"({', '.join(_HEAD_DIM)})"
            )
        kept_heads, dim = _heads_kept(q_rows, heads, head_dim, f"{name} (query)")
        if dim != head_dim:
            raise BadInputError(
                f"plan prunes within the heads of {name} (heads='dim'): its forward may derive "
                "the attention scale from the head size; only whole heads are supported"
            )
        kv_name = _first_attribute(parent, _KV_HEADS)
        kv_heads = getattr(parent, kv_name) if kv_name else heads
        left_counts = []
        for projection, label in ((k, "key"), (v, "value")):
            rows = None
            if projection is not None and id(projection) in changed:
                rows = changed[id(projection)].get("weight", {}).get(0)
            left, kv_dim = _heads_kept(rows, kv_heads, head_dim, f"{name} ({label})")
            if kv_dim != head_dim:
                raise BadInputError(f"plan prunes within the {label} heads of {name}")
            left_counts.append(len(left))
        if left_counts[0] != left_counts[1]:
            raise BadInputError(f"plan keeps different key and value heads of {name}")
        kv_left = left_counts[0]
        setattr(parent, heads_name, len(kept_heads))
        if kv_name:
            setattr(parent, kv_name, kv_left)
        elif kv_left != len(kept_heads):
            raise BadInputError(f"plan keeps different query and key/value heads of {name}")
        if isinstance(getattr(parent, "num_key_value_groups", None), int):
            parent.num_key_value_groups = len(kept_heads) // kv_left
        for attribute in _ALL_HEAD:
            if isinstance(getattr(parent, attribute, None), int):
                setattr(parent, attribute, len(kept_heads) * head_dim)
