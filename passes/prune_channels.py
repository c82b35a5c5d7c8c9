"""Rewrite: remove the planned channels from weights, shape constants and attributes.

Weights (initializers and lowered Constant nodes alike) lose the planned indices along each
member axis. Ops whose constants or attributes encode a pruned size are rewritten from the
new sizes: Reshape targets (0/-1 kept), Expand shapes, Split sizes, Slice bounds, Gather
indices, Resize sizes, the ``group`` of grouped convolutions and GroupNormalization's
``num_groups``. Tensor shapes are then inferred afresh. Node and tensor names are kept.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from spa_compiler.channel_graph import Group
from spa_compiler.errors import PassError
from spa_compiler.ir import Model
from spa_compiler.op_rules import concat_behind, slice_positions
from spa_compiler.pipeline import Pass, PassResult
from spa_compiler.plan import Plan, removed_indices

Space = tuple[str, int]


class PruneChannels(Pass):
    name = "prune-channels"

    def __init__(self, plan: Plan, groups: dict[int, Group]) -> None:
        self.plan, self.groups = plan, groups

    def call(self, model: Model) -> PassResult:
        graph = model.graph
        removed = removed_indices(self.plan, self.groups)
        if not removed:
            return PassResult(model, changed=False, details={"removed_indices": 0})
        rewriter = _Rewriter(graph, removed, model.opset)
        rewriter.constants()
        for node in list(graph.nodes):
            rewriter.node(node)
        boundary = {t.name for t in [*graph.inputs, *graph.outputs]}
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Variable) and tensor.name not in boundary:
                tensor.shape = None
        return PassResult(
            model, changed=True, details={"removed_indices": sum(map(len, removed.values()))}
        )


class _Rewriter:
    def __init__(self, graph: gs.Graph, removed: dict[Space, set[int]], opset: int) -> None:
        self.graph = graph
        self.removed = removed
        self.tensors = graph.tensors()
        self.written: dict[tuple[str, int], list[int]] = {}
        self.created: set[str] = set()
        self.opset = opset
        self.old_shape = {
            name: list(t.shape) for name, t in self.tensors.items() if t.shape is not None
        }

    # -- sizes -----------------------------------------------------------------------------
    def old_dim(self, name: str, axis: int) -> int | str | None:
        shape = self.old_shape.get(name)
        return None if shape is None or axis >= len(shape) else shape[axis]

    def new_dim(self, name: str, axis: int) -> int | str | None:
        dim = self.old_dim(name, axis)
        if isinstance(dim, int):
            return dim - len(self.removed.get((name, axis), ()))
        return dim

    def changed(self, name: str, axis: int) -> bool:
        return bool(self.removed.get((name, axis)))

    def kept_positions(self, name: str, axis: int, size: int) -> np.ndarray:
        gone = self.removed.get((name, axis), set())
        return np.array([i for i in range(size) if i not in gone], dtype=np.int64)

    # -- weights ---------------------------------------------------------------------------
    def constants(self) -> None:
        by_tensor: dict[str, list[int]] = defaultdict(list)
        for name, axis in self.removed:
            by_tensor[name].append(axis)
        for name, axes in by_tensor.items():
            tensor = self.tensors.get(name)
            if not isinstance(tensor, gs.Constant):
                continue
            values = np.asarray(tensor.values)
            for axis in axes:
                values = np.delete(values, sorted(self.removed[(name, axis)]), axis=axis)
            tensor.values = np.ascontiguousarray(values)

    def fresh_name(self, base: str) -> str:
        """A tensor name not used in the graph yet (unnamed nodes would otherwise collide)."""
        name, count = base, 1
        while name in self.tensors or name in self.created:
            count += 1
            name = f"{base}_{count}"
        self.created.add(name)
        return name

    def set_constant(self, node: gs.Node, index: int, values: np.ndarray) -> None:
        """Give ``node`` new constant values at ``index`` without touching other users."""
        current = node.inputs[index]
        values = np.asarray(values, dtype=np.asarray(current.values).dtype)
        if np.array_equal(values, np.asarray(current.values)):
            return
        if len(current.outputs) == 1:
            current.values = values
        else:
            node.inputs[index] = gs.Constant(
                self.fresh_name(f"{current.name}__{node.name or node.op}"), values
            )

    # -- ops -------------------------------------------------------------------------------
    def node(self, node: gs.Node) -> None:
        handler = getattr(self, f"op_{node.op}", None)
        if handler is not None:
            handler(node)

    def op_Conv(self, node: gs.Node) -> None:  # noqa: N802 - handlers are named after ops
        groups = int(node.attrs.get("group", 1))
        x = node.inputs[0].name
        if groups > 1 and self.changed(x, 1):
            per_group = int(self.old_dim(x, 1)) // groups
            node.attrs["group"] = int(self.new_dim(x, 1)) // per_group

    op_ConvTranspose = op_Conv  # noqa: N815

    def op_GroupNormalization(self, node: gs.Node) -> None:  # noqa: N802
        x = node.inputs[0].name
        if self.changed(x, 1):
            groups = int(node.attrs["num_groups"])
            per_group = int(self.old_dim(x, 1)) // groups
            node.attrs["num_groups"] = int(self.new_dim(x, 1)) // per_group

    def rewrite_target(self, node: gs.Node, index: int, update) -> None:
        """Rewrite a shape operand given as a constant or as a Concat of parts; ``update``
        maps (position, old value) to the new value."""
        target = node.inputs[index]
        if isinstance(target, gs.Constant):
            values = np.asarray(target.values).reshape(-1).copy()
            for i, value in enumerate(values):
                values[i] = update(i, int(value))
            self.set_constant(node, index, values)
            return
        producer = concat_behind(target)
        if producer is None:
            return  # Shape(t) as target: follows t, whose axes the analysis coupled
        position = 0
        for part_index, part in enumerate(producer.inputs):
            length = int(part.shape[0]) if part.shape else 1
            if isinstance(part, gs.Constant):
                values = np.asarray(part.values).reshape(-1).copy()
                for k, value in enumerate(values):
                    values[k] = update(position + k, int(value))
                key = (producer.name, part_index)
                previous = self.written.setdefault(key, values.tolist())
                if previous != values.tolist():
                    raise PassError(
                        f"shape operand '{target.name}' is shared by ops that need different "
                        "sizes after pruning"
                    )
                self.set_constant(producer, part_index, values)
            position += length

    def op_Reshape(self, node: gs.Node) -> None:  # noqa: N802
        out = node.outputs[0].name

        def update(i: int, value: int) -> int:
            return int(self.new_dim(out, i)) if value > 0 and self.changed(out, i) else value

        self.rewrite_target(node, 1, update)

    def op_Expand(self, node: gs.Node) -> None:  # noqa: N802
        out = node.outputs[0].name
        length = node.inputs[1].shape[0] if node.inputs[1].shape else None
        if not isinstance(length, int):
            return
        shift = len(self.old_shape.get(out, [])) - length

        def update(i: int, value: int) -> int:
            axis = i + shift
            if self.changed(out, axis) and value == self.old_dim(out, axis):
                return int(self.new_dim(out, axis))
            return value

        self.rewrite_target(node, 1, update)

    def op_Split(self, node: gs.Node) -> None:  # noqa: N802
        x = node.inputs[0].name
        rank = len(self.old_shape.get(x, []))
        axis = int(node.attrs.get("axis", 0))
        axis = axis + rank if axis < 0 else axis
        if not any(self.changed(out.name, axis) for out in node.outputs):
            return
        sizes = np.array([self.new_dim(out.name, axis) for out in node.outputs], dtype=np.int64)
        if "split" in node.attrs or self.opset < 13:  # sizes are an attribute before opset 13
            node.attrs["split"] = sizes.tolist()
        elif len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
            self.set_constant(node, 1, sizes)
        else:
            node.attrs.pop("num_outputs", None)
            node.inputs.append(
                gs.Constant(self.fresh_name(f"{node.name or node.op}__split"), sizes)
            )

    def op_Slice(self, node: gs.Node) -> None:  # noqa: N802
        if len(node.inputs) < 3:
            raise PassError(f"Slice '{node.name}' of opset < 10 on a pruned axis")
        x, out = node.inputs[0].name, node.outputs[0].name
        rank = len(self.old_shape.get(x, []))
        constants = [node.inputs[i] if i < len(node.inputs) else None for i in range(1, 5)]
        if not any(self.changed(x, a) or self.changed(out, a) for a in range(rank)):
            return  # (bounds may be computed at run time: a sequence cut to its length)
        if not all(isinstance(c, gs.Constant) for c in constants if c is not None):
            raise PassError(f"Slice '{node.name}' has run-time bounds on a pruned axis")
        starts, ends = (np.asarray(c.values).reshape(-1).copy() for c in constants[:2])
        axes = (
            np.asarray(constants[2].values).reshape(-1)
            if constants[2] is not None
            else np.arange(len(starts))
        )
        steps = (
            np.asarray(constants[3].values).reshape(-1).copy()
            if constants[3] is not None
            else np.ones(len(starts), np.int64)
        )
        touched = False
        for k, axis in enumerate(axes):
            axis = int(axis) + rank if axis < 0 else int(axis)
            if not (self.changed(x, axis) or self.changed(out, axis)):
                continue
            size = int(self.old_dim(x, axis))
            selected = slice_positions(size, int(starts[k]), int(ends[k]), int(steps[k]))
            kept_in = self.kept_positions(x, axis, size)
            new_index = {int(p): i for i, p in enumerate(kept_in)}
            kept_out = self.kept_positions(out, axis, len(selected))
            chosen = [new_index[int(selected[j])] for j in kept_out]
            if not chosen:
                raise PassError(f"Slice '{node.name}': no kept channel left to slice")
            step = chosen[1] - chosen[0] if len(chosen) > 1 else 1
            if step == 0 or any(b - a != step for a, b in itertools.pairwise(chosen)):
                raise PassError(f"Slice '{node.name}': the kept channels are not a slice")
            starts[k], steps[k] = chosen[0], step
            end = chosen[-1] + step
            # A negative step ending before index 0: -(size + 1) clamps there in any int type.
            ends[k] = end if end >= 0 else -(len(kept_in) + 1)
            touched = True
        if touched:
            self.set_constant(node, 1, starts)
            self.set_constant(node, 2, ends)
            if constants[3] is not None:
                self.set_constant(node, 4, steps)
            elif not np.all(steps == 1):
                raise PassError(f"Slice '{node.name}': the kept channels need a step")

    def op_Gather(self, node: gs.Node) -> None:  # noqa: N802
        data, indices, out = node.inputs[0].name, node.inputs[1], node.outputs[0].name
        rank = len(self.old_shape.get(data, []))
        axis = int(node.attrs.get("axis", 0))
        axis = axis + rank if axis < 0 else axis
        if not isinstance(indices, gs.Constant) or np.asarray(indices.values).ndim != 1:
            return
        if not (self.changed(data, axis) or self.changed(out, axis)):
            return
        size = int(self.old_dim(data, axis))
        values = np.asarray(indices.values)
        values = np.where(values < 0, values + size, values)
        new_index = {int(p): i for i, p in enumerate(self.kept_positions(data, axis, size))}
        kept_out = self.kept_positions(out, axis, len(values))
        self.set_constant(node, 1, np.array([new_index[int(values[j])] for j in kept_out]))

    def op_Resize(self, node: gs.Node) -> None:  # noqa: N802
        out = node.outputs[0].name
        if len(node.inputs) > 3 and isinstance(node.inputs[3], gs.Constant):
            sizes = np.asarray(node.inputs[3].values).reshape(-1).copy()
            rank = len(self.old_shape.get(out, sizes))
            axes = [
                int(a) + rank if int(a) < 0 else int(a) for a in node.attrs.get("axes", range(rank))
            ]
            for k, axis in enumerate(axes):
                if self.changed(out, axis):
                    sizes[k] = self.new_dim(out, axis)
            self.set_constant(node, 3, sizes)
