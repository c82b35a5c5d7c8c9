"""The channel graph: which channels of which tensors must be removed together.

Nodes of the networkx graph are *channel spaces* ``(tensor, axis)``. An edge says that channel
``a_idx[k]`` of one space is the same channel as ``b_idx[k]`` of the other (identity,
offsets for Concat/Split/Slice, gathers, repeats, conv-group blocks). A reshape that splits or
merges an axis is a *factorization*: the whole axis is the row-major product of its factors;
exactly one factor stays free to prune and the others are kept whole, so a removal is always a
product set the reshape can still express.

Every channel (an *atom*: one index of one space) ends in one connected component; a component
is one prunable channel unit. Components that touch the same spaces in the same way form a
*group*: a set of channel spaces that must drop the same channel set. A component that touches
a blocked space is blocked, and the reason is kept.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from spa_compiler.errors import BadInputError

Space = tuple[str, int]

# Every channel of every space becomes an atom in arrays of a few int64s each. A real model's
# channel axes are axes of its weights and their activations: under 1% of its weight values
# in ResNet-50, BERT and MobileNet. Declared sizes far past that are lies that would exhaust
# memory before any other check could run.
MIN_ATOM_LIMIT = 2**22
WEIGHT_VALUES_PER_ATOM = 4

PRODUCER = "producer"
CONSUMER = "consumer"
PARAM = "param"
CONTRACTED = "contracted"


@dataclass
class Factorization:
    whole: Space
    factors: list[Space]
    sizes: list[int]
    node: str
    op: str


@dataclass
class Member:
    """One channel space of a group and, per group channel, the indices it owns there."""

    tensor: str
    axis: int
    indices: np.ndarray  # shape [group channels, indices per channel]
    is_weight: bool
    roles: list[tuple[str, str]]  # (role, node name)

    @property
    def per_channel(self) -> int:
        return int(self.indices.shape[1])

    def to_json(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "axis": self.axis,
            "kind": "weight" if self.is_weight else "activation",
            "roles": sorted({f"{role}:{node}" for role, node in self.roles}),
            "per_channel": self.per_channel,
        }


@dataclass
class Group:
    id: int
    channels: int
    granularity: int
    members: list[Member]
    blocked_reasons: list[str]
    prunable: bool

    def with_role(self, role: str) -> list[Member]:
        return [m for m in self.members if any(r == role for r, _ in m.roles)]

    @property
    def sources(self) -> list[Member]:
        return [m for m in self.with_role(PRODUCER) if m.is_weight]

    @property
    def consumers(self) -> list[Member]:
        return [m for m in self.with_role(CONSUMER) if m.is_weight]

    @property
    def params(self) -> list[Member]:
        return [m for m in self.with_role(PARAM) if m.is_weight]

    @property
    def weight_members(self) -> list[Member]:
        return [m for m in self.members if m.is_weight]

    @property
    def passthrough(self) -> list[Member]:
        return [m for m in self.members if not m.is_weight]

    def weight_parameters(self, sizes: dict[str, int]) -> int:
        """Weight elements this group's channels own (each weight tensor counted once)."""
        seen: dict[str, int] = {}
        for member in self.weight_members:
            seen[member.tensor] = sizes.get(member.tensor, 0)
        return sum(seen.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "channels": self.channels,
            "granularity": self.granularity,
            "prunable": self.prunable,
            "blocked_reasons": self.blocked_reasons,
            "sources": [_describe(m) for m in self.sources],
            "consumers": [_describe(m) for m in self.consumers],
            "params": [_describe(m) for m in self.params],
            "passthrough": [_describe(m) for m in self.passthrough],
            "members": [m.to_json() for m in self.members],
        }


def _describe(member: Member) -> str:
    return f"{member.tensor}[axis {member.axis}]"


# ONNX float types numpy lacks (bfloat16, float8, float4): graphsurgeon keeps their number.
_ONNX_FLOAT_TYPES = {1, 10, 11, 16, 17, 18, 19, 20, 23}


def is_floating(dtype: object) -> bool:
    """Whether a graphsurgeon dtype (numpy dtype, or ONNX type number) is floating point.
    A rewritten bfloat16/float8 weight holds an ml_dtypes array (onnx's reader gives one),
    whose dtype NumPy does not count as floating: ONNX's type table decides."""
    if isinstance(dtype, int | np.integer):
        return int(dtype) in _ONNX_FLOAT_TYPES
    try:
        if np.issubdtype(dtype, np.floating):
            return True
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) in _ONNX_FLOAT_TYPES
    except (TypeError, KeyError, ValueError):
        return False


def node_key(node: gs.Node) -> str:
    """How roles name a node: its name, or its op and identity when it has none."""
    return node.name or f"{node.op}@{id(node)}"


def is_weight_constant(tensor: gs.Tensor | None) -> bool:
    """Floating-point constants are weights, and integer ones a DequantizeLinear reads as
    data (quantized weights); other integer constants are shapes and indices."""
    if not isinstance(tensor, gs.Constant):
        return False
    if is_floating(tensor.dtype):
        return True
    return any(
        node.op == "DequantizeLinear" and node.inputs[0] is tensor for node in tensor.outputs
    )


@dataclass
class ChannelGraph:
    """Channel spaces of one graph, their couplings, blocks and weight roles."""

    graph: gs.Graph
    spaces: nx.MultiGraph = field(default_factory=nx.MultiGraph)
    factorizations: list[Factorization] = field(default_factory=list)
    blocked: dict[Space, list[str]] = field(default_factory=lambda: defaultdict(list))
    roles: dict[Space, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))
    head_spaces: set[Space] = field(default_factory=set)
    # Shapes of tensors that exist only in the analysis (a reshape's common factors).
    virtual: dict[str, list[int]] = field(default_factory=dict)
    _constant_only: dict[str, bool] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.tensors = self.graph.tensors()
        weight_values = sum(
            int(np.prod(t.shape, dtype=np.float64))
            for t in self.tensors.values()
            if isinstance(t, gs.Constant) and t.shape is not None
        )
        self.atom_limit = max(MIN_ATOM_LIMIT, int(weight_values) // WEIGHT_VALUES_PER_ATOM)
        self.atoms = 0

    # -- facts about tensors ------------------------------------------------------------------
    def shape(self, name: str) -> list[int | str | None] | None:
        if name in self.virtual:
            return list(self.virtual[name])
        tensor = self.tensors.get(name)
        if tensor is None or tensor.shape is None:
            return None
        return list(tensor.shape)

    def size(self, space: Space) -> int | None:
        shape = self.shape(space[0])
        if shape is None or not 0 <= space[1] < len(shape):
            return None
        dim = shape[space[1]]
        return dim if isinstance(dim, int) and dim >= 0 else None

    def is_weight(self, name: str) -> bool:
        return is_weight_constant(self.tensors.get(name))

    def from_constants(self, name: str) -> bool:
        """Whether a tensor is a constant or computed from constants only (no graph input)."""
        cache = self._constant_only
        if name in cache:
            return cache[name]
        tensor = self.tensors.get(name)
        cache[name] = False  # cycles and graph inputs are not constant
        if isinstance(tensor, gs.Constant):
            cache[name] = True
        elif tensor is not None and len(tensor.inputs) == 1 and tensor.inputs[0].inputs:
            node = tensor.inputs[0]
            cache[name] = node.op not in ("RandomNormal", "RandomUniform") and all(
                self.from_constants(t.name) for t in node.inputs if t.name
            )
        return cache[name]

    # -- building -----------------------------------------------------------------------------
    def add_space(self, space: Space) -> bool:
        """Add a space if its size is known; return whether it has channels."""
        size = self.size(space)
        if size is None:
            return False
        if space not in self.spaces:
            self.atoms += size
            if self.atoms > self.atom_limit:
                raise BadInputError(
                    f"tensor '{space[0]}' declares {size} channels on axis {space[1]}: the "
                    f"channel graph would hold over {self.atom_limit} channels, more than a "
                    "model with these weights can use (absurd declared sizes?)"
                )
            self.spaces.add_node(space, size=size)
            if size == 1:
                self.blocked[space].append("axis of size 1")
        return True

    def link(
        self,
        a: Space,
        b: Space,
        a_idx: np.ndarray | None = None,
        b_idx: np.ndarray | None = None,
        node: str = "",
    ) -> None:
        """Channel a_idx[k] of ``a`` is channel b_idx[k] of ``b`` (identity when both None)."""
        known_a, known_b = self.add_space(a), self.add_space(b)
        if not known_a and not known_b:
            return
        if not (known_a and known_b):
            known = a if known_a else b
            self.block(known, f"'{node}' maps it to an axis of unknown size")
            return
        if a_idx is None and b_idx is None:
            size_a, size_b = self.size(a), self.size(b)
            if size_a != size_b:
                self.block(a, f"'{node}' maps axes of different sizes ({size_a} vs {size_b})")
                self.block(b, f"'{node}' maps axes of different sizes ({size_a} vs {size_b})")
                return
            a_idx = b_idx = np.arange(size_a, dtype=np.int64)
        assert a_idx is not None and b_idx is not None and len(a_idx) == len(b_idx)
        self.spaces.add_edge(
            a,
            b,
            a=a,
            b=b,
            a_idx=np.asarray(a_idx, np.int64),
            b_idx=np.asarray(b_idx, np.int64),
            node=node,
        )

    def block(self, space: Space, reason: str) -> None:
        if self.add_space(space) and reason not in self.blocked[space]:
            self.blocked[space].append(reason)

    def factor(self, whole: Space, factors: list[Space], node: str, op: str) -> None:
        """``whole`` is the row-major product of ``factors`` (a reshape split or merge)."""
        sizes = [self.size(f) for f in factors]
        if self.size(whole) is None or any(s is None for s in sizes):
            for space in [whole, *factors]:
                self.block(space, f"'{node}' reshapes axes of unknown size")
            return
        self.add_space(whole)
        for space in factors:
            self.add_space(space)
        self.factorizations.append(Factorization(whole, factors, sizes, node, op))  # type: ignore[arg-type]

    def add_role(self, space: Space, role: str, node: str) -> None:
        if self.add_space(space) and (role, node) not in self.roles[space]:
            self.roles[space].append((role, node))

    # -- solving ------------------------------------------------------------------------------
    def solve(self, heads: str = "head") -> list[Group]:
        """Resolve factorizations, find channel components and collect them into groups."""
        self._resolve_factorizations(heads)
        return self._groups()

    def _resolve_factorizations(self, heads: str) -> None:
        # A cheap space-level union-find over one-to-one edges tells which spaces are wholly
        # blocked before deciding which factor of a reshape stays free.
        parent: dict[Space, Space] = {}

        def find(space: Space) -> Space:
            parent.setdefault(space, space)
            while parent[space] != space:
                parent[space] = parent[parent[space]]
                space = parent[space]
            return space

        blocked_roots: set[Space] = set()
        head_roots: set[Space] = set()

        def union(a: Space, b: Space) -> None:
            root_a, root_b = find(a), find(b)
            if root_a != root_b:
                parent[root_b] = root_a
                for flagged in (blocked_roots, head_roots):
                    if root_b in flagged:
                        flagged.add(root_a)

        for a, b, data in self.spaces.edges(data=True):
            size_a, size_b = self.spaces.nodes[a]["size"], self.spaces.nodes[b]["size"]
            if size_a == size_b == len(data["a_idx"]):
                union(a, b)
        blocked_roots.update(find(space) for space, reasons in self.blocked.items() if reasons)
        head_roots.update(find(space) for space in self.head_spaces)

        # A factorization whose whole is blocked blocks every factor, whichever is chosen; one
        # whose whole is an attention-head axis makes its factors head axes (grouped-query
        # attention merges (kv heads, repeats) into the query heads).
        changed = True
        while changed:
            changed = False
            for fact in self.factorizations:
                for flagged in (blocked_roots, head_roots):
                    if find(fact.whole) in flagged:
                        for space in fact.factors:
                            if find(space) not in flagged:
                                flagged.add(find(space))
                                changed = True

        for fact in self.factorizations:
            candidates = [(i, space) for i, space in enumerate(fact.factors) if fact.sizes[i] > 1]
            if not candidates:
                continue
            free = [c for c in candidates if find(c[1]) not in blocked_roots]
            pool = free or candidates
            if heads == "head":
                preferred = [c for c in pool if find(c[1]) in head_roots]
            else:
                preferred = [c for c in pool if find(c[1]) not in head_roots]
            pool = preferred or pool
            if not any(find(c[1]) in head_roots for c in candidates):
                # No attention heads involved: keep the finest prunable unit.
                pool = sorted(pool, key=lambda c: (-fact.sizes[c[0]], c[0]))
            chosen_index, chosen = pool[0]
            whole_size = int(np.prod(fact.sizes))
            factor_index = np.unravel_index(np.arange(whole_size), fact.sizes)[chosen_index]
            self.link(fact.whole, chosen, np.arange(whole_size), factor_index, node=fact.node)
            union(fact.whole, chosen)
            for _, space in candidates:
                if space != chosen:
                    self.block(
                        space,
                        f"{fact.op} '{fact.node}' keeps this factor whole "
                        f"(axis {chosen[1]} of '{chosen[0]}' is the prunable one)",
                    )
                    blocked_roots.add(find(space))

    def _groups(self) -> list[Group]:
        spaces = list(self.spaces.nodes)
        index = {space: i for i, space in enumerate(spaces)}
        sizes = np.array([self.spaces.nodes[s]["size"] for s in spaces], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        total = int(offsets[-1])
        if total == 0:
            return []

        rows, cols = [], []
        for _, _, data in self.spaces.edges(data=True):
            rows.append(offsets[index[data["a"]]] + data["a_idx"])
            cols.append(offsets[index[data["b"]]] + data["b_idx"])
        row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        col = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        adjacency = coo_matrix((np.ones(len(row), np.int8), (row, col)), shape=(total, total))
        _, labels = connected_components(adjacency, directed=False)

        space_of_atom = np.repeat(np.arange(len(spaces)), sizes)
        # Renumber components by their first atom so group and channel order are deterministic.
        first_atom = np.full(labels.max() + 1, total, dtype=np.int64)
        np.minimum.at(first_atom, labels, np.arange(total))
        rank = np.empty_like(first_atom)
        rank[np.argsort(first_atom, kind="stable")] = np.arange(len(first_atom))
        labels = rank[labels]

        blocked_reasons: dict[int, list[str]] = defaultdict(list)
        for space, reasons in self.blocked.items():
            if not reasons or space not in index:
                continue
            i = index[space]
            for label in np.unique(labels[offsets[i] : offsets[i + 1]]):
                for reason in reasons:
                    text = f"{space[0]}[axis {space[1]}]: {reason}"
                    if text not in blocked_reasons[int(label)]:
                        blocked_reasons[int(label)].append(text)

        # One row per (component, space) with its atom count, sorted by component then space.
        n_spaces = len(spaces)
        pairs, counts = np.unique(labels * n_spaces + space_of_atom, return_counts=True)
        pair_labels, pair_spaces = pairs // n_spaces, pairs % n_spaces
        table = np.stack([pair_spaces, counts], axis=1).astype(np.int64)
        boundaries = np.flatnonzero(np.diff(pair_labels)) + 1
        starts = np.concatenate([[0], boundaries]).tolist()
        ends = np.concatenate([boundaries, [len(pairs)]]).tolist()

        by_signature: dict[bytes, list[int]] = {}
        signatures: dict[bytes, np.ndarray] = {}
        for start, end in zip(starts, ends, strict=True):
            rows = table[start:end]
            key = rows.tobytes()
            if key not in by_signature:
                by_signature[key] = []
                signatures[key] = rows
            by_signature[key].append(int(pair_labels[start]))

        groups: list[Group] = []
        channel_of_label = np.full(labels.max() + 1, -1, dtype=np.int64)
        for key, components in by_signature.items():
            signature = signatures[key].tolist()
            components_array = np.array(components, dtype=np.int64)
            channel_of_label[components_array] = np.arange(len(components))
            members: list[Member] = []
            for space_id, per_channel in signature:
                space = spaces[space_id]
                if space[0] in self.virtual:
                    continue
                local_channels = channel_of_label[labels[offsets[space_id] : offsets[space_id + 1]]]
                atoms = np.flatnonzero(local_channels >= 0)
                atoms = atoms[np.lexsort((atoms, local_channels[atoms]))]
                members.append(
                    Member(
                        tensor=space[0],
                        axis=space[1],
                        indices=atoms.reshape(len(components), per_channel),
                        is_weight=self.is_weight(space[0]),
                        roles=list(self.roles.get(space, [])),
                    )
                )
            channel_of_label[components_array] = -1
            reasons: list[str] = []
            for label in components:
                for reason in blocked_reasons.get(label, []):
                    if reason not in reasons:
                        reasons.append(reason)
            if members:  # groups of analysis-only factors are internal
                groups.append(self._make_group(len(groups), members, reasons))
        return groups

    def _make_group(self, group_id: int, members: list[Member], reasons: list[str]) -> Group:
        channels = int(members[0].indices.shape[0])
        sources = [m for m in members if m.is_weight and any(r == PRODUCER for r, _ in m.roles)]
        reference = sources or [m for m in members if m.is_weight] or members
        granularity = max(m.per_channel for m in reference)
        prunable = not reasons
        if prunable and channels < 2:
            reasons = ["a single channel: removing it would leave the group empty"]
            prunable = False
        if prunable and not any(m.is_weight for m in members):
            reasons = ["no weight produces or reads these channels"]
            prunable = False

        return Group(group_id, channels, granularity, members, reasons, prunable)
