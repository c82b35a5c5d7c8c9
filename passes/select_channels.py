"""Selection: turn scores into a plan (which channels of each group stay)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import numpy as np

from spa_compiler.analysis import Analysis
from spa_compiler.channel_graph import Group
from spa_compiler.criteria import score_group
from spa_compiler.errors import BadInputError
from spa_compiler.ir import Model
from spa_compiler.pipeline import Pass, PassResult
from spa_compiler.plan import Plan, group_plan


def excluded(group: Group, patterns: Sequence[str]) -> bool:
    """A group is protected if any tensor it touches, or any node using it, matches."""
    names = {m.tensor for m in group.members}
    names |= {node for m in group.members for _, node in m.roles}
    return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in patterns)


def kept_count(group: Group, ratio: float, round_to: int) -> int:
    """Channels to keep: remove ``ratio`` of them, keep the tensor size a multiple of
    ``round_to`` where possible, and never empty the group."""
    channels = group.channels
    keep = channels - math.floor(ratio * channels + 1e-9)
    if round_to > 1:
        unit = round_to // math.gcd(round_to, group.granularity)
        rounded = max(unit, round(keep / unit) * unit)
        keep = rounded if rounded <= channels else keep
    return max(1, min(channels, keep))


class SelectChannels(Pass):
    name = "select-channels"

    def __init__(
        self,
        analysis: Analysis,
        ratio: float,
        criterion: str = "l1",
        aggregation: str = "sum",
        round_to: int = 1,
        exclude: Sequence[str] = (),
        seed: int = 0,
    ) -> None:
        if not 0.0 <= ratio < 1.0:
            raise BadInputError(f"ratio must be in [0, 1), not {ratio}")
        if round_to < 1:
            raise BadInputError(f"round-to must be a positive integer, not {round_to}")
        self.analysis, self.ratio, self.criterion = analysis, ratio, criterion
        self.aggregation, self.round_to, self.exclude, self.seed = (
            aggregation,
            round_to,
            tuple(exclude),
            seed,
        )

    def call(self, model: Model) -> PassResult:
        plans = []
        for group in self.analysis.prunable:
            scores = score_group(group, model.graph, self.criterion, self.aggregation, self.seed)
            if excluded(group, self.exclude):
                keep = np.arange(group.channels)
            else:
                count = kept_count(group, self.ratio, self.round_to)
                # Highest scores stay; ties broken by channel index for determinism.
                order = np.lexsort((np.arange(group.channels), -scores))
                keep = np.sort(order[:count])
            plans.append(group_plan(group, keep, scores))
        plan = Plan(
            groups=plans,
            heads=self.analysis.heads,
            criterion=self.criterion,
            ratio=self.ratio,
            metadata={
                "aggregation": self.aggregation,
                "round_to": self.round_to,
                "exclude": list(self.exclude),
                "seed": self.seed,
            },
        )
        return PassResult(model, changed=False, details={"plan": plan})
