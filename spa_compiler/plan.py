"""The pruning plan: a first-class, JSON-serialisable record of what a compile removes.

For every group it holds the channels kept and every tensor axis the group touches, with the
indices each channel owns there, so a plan can be reviewed, edited, saved (``--save-plan``)
and applied later (``--plan``) to the same model.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spa_compiler.analysis import Analysis
from spa_compiler.channel_graph import Group
from spa_compiler.errors import BadInputError

PLAN_VERSION = 1


@dataclass
class GroupPlan:
    group: int
    channels: int
    keep: list[int]
    # {"tensor", "axis", "indices": [[...] per channel], "kind": "weight" | "activation"}; plans
    # saved before "kind" was recorded lack it
    members: list[dict[str, Any]]
    scores: list[float] | None = None

    @property
    def removed(self) -> list[int]:
        kept = set(self.keep)
        return [c for c in range(self.channels) if c not in kept]


@dataclass
class Plan:
    groups: list[GroupPlan]
    heads: str = "head"
    criterion: str = "l1"
    ratio: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "heads": self.heads,
            "criterion": self.criterion,
            "ratio": self.ratio,
            "metadata": self.metadata,
            "groups": [
                {
                    "group": g.group,
                    "channels": g.channels,
                    "keep": g.keep,
                    "members": [
                        {**m, "indices": np.asarray(m["indices"]).tolist()} for m in g.members
                    ],
                    **({"scores": g.scores} if g.scores is not None else {}),
                }
                for g in self.groups
            ],
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        from spa_compiler.io import write_atomic

        text = json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n"
        write_atomic(pathlib.Path(path), text.encode())

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
            raise BadInputError(f"not a spa plan (version {PLAN_VERSION} expected)")
        try:
            groups = [
                GroupPlan(
                    group=int(g["group"]),
                    channels=int(g["channels"]),
                    keep=[int(c) for c in g["keep"]],
                    members=[
                        {
                            "tensor": str(m["tensor"]),
                            "axis": int(m["axis"]),
                            "indices": np.asarray(m["indices"], dtype=np.int64),
                            **({"kind": str(m["kind"])} if "kind" in m else {}),
                        }
                        for m in g["members"]
                    ],
                    scores=g.get("scores"),
                )
                for g in data["groups"]
            ]
        except (KeyError, TypeError, ValueError) as error:
            raise BadInputError(f"malformed plan: {error}") from None
        return cls(
            groups=groups,
            heads=str(data.get("heads", "head")),
            criterion=str(data.get("criterion", "l1")),
            ratio=data.get("ratio"),
            metadata=dict(data.get("metadata", {})),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        try:
            data = json.loads(pathlib.Path(path).read_text())
        except FileNotFoundError:
            raise BadInputError(f"{path}: no such plan file") from None
        except (OSError, ValueError) as error:
            raise BadInputError(f"{path}: cannot read plan ({error})") from None
        return cls.from_json(data)


def removed_indices(
    plan: Plan, groups: dict[int, Group], consumers_only: bool = False
) -> dict[tuple[str, int], set[int]]:
    """Per (tensor, axis), the indices the plan removes there: from every member of a
    planned group, or from its consumer weights only."""
    removed: dict[tuple[str, int], set[int]] = defaultdict(set)
    for planned in plan.groups:
        channels = planned.removed
        if not channels:
            continue
        group = groups[planned.group]
        for member in group.consumers if consumers_only else group.members:
            removed[(member.tensor, member.axis)].update(
                member.indices[channels].reshape(-1).tolist()
            )
    return removed


def group_plan(group: Group, keep: np.ndarray | list[int], scores=None) -> GroupPlan:
    return GroupPlan(
        group=group.id,
        channels=group.channels,
        keep=sorted(int(c) for c in keep),
        members=[
            {
                "tensor": m.tensor,
                "axis": m.axis,
                "indices": m.indices,
                # which members are weights: what carrying the plan to another framework slices
                "kind": "weight" if m.is_weight else "activation",
            }
            for m in group.members
        ],
        scores=None if scores is None else [float(s) for s in scores],
    )


def check_plan_matches(plan: Plan, analysis: Analysis) -> dict[int, Group]:
    """Match each planned group to this model's analysis; refuse a plan made for another
    model or that keeps channels of a blocked group."""

    def key(members: list[tuple[str, int, np.ndarray]]) -> frozenset:
        return frozenset(
            (tensor, int(axis), indices.shape, np.ascontiguousarray(indices, np.int64).tobytes())
            for tensor, axis, indices in members
        )

    by_members = {
        key([(m.tensor, m.axis, m.indices) for m in g.members]): g for g in analysis.groups
    }
    matched: dict[int, Group] = {}
    for planned in plan.groups:
        group = by_members.get(
            key([(m["tensor"], m["axis"], np.asarray(m["indices"])) for m in planned.members])
        )
        if group is None or group.channels != planned.channels:
            raise BadInputError(
                f"plan group {planned.group} does not match any group of this model "
                "(was the plan made for another model, or with other --heads?)"
            )
        if planned.removed and not group.prunable:
            raise BadInputError(
                f"plan removes channels of group {group.id}, which is blocked: "
                f"{group.blocked_reasons[0]}"
            )
        if not planned.keep:
            raise BadInputError(f"plan group {planned.group} keeps no channel")
        if any(not 0 <= c < group.channels for c in planned.keep):
            raise BadInputError(f"plan group {planned.group} keeps a channel out of range")
        matched[planned.group] = group
        kinds = {
            (m.tensor, m.axis): "weight" if m.is_weight else "activation" for m in group.members
        }
        for member in planned.members:  # a plan saved before kinds were recorded gains them
            member.setdefault("kind", kinds[(member["tensor"], int(member["axis"]))])
    return matched
