"""Selection: turn scores into a plan (which channels of each group stay)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import numpy as np

from spa_compiler.analysis import Analysis
from spa_compiler.channel_graph import Group
from spa_compiler.criteria import ObsContext, score_group
from spa_compiler.errors import BadInputError
from spa_compiler.ir import Model
from spa_compiler.pipeline import Pass, PassResult
from spa_compiler.plan import GroupPlan, Plan, group_plan


def excluded(group: Group, patterns: Sequence[str]) -> bool:
    """A group is protected if any tensor it touches, or any node using it, matches."""
    names = {m.tensor for m in group.members}
    names |= {node for m in group.members for _, node in m.roles}
    return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in patterns)


# ``round_to="auto"``: channel counts onnxruntime's and the GPU libraries' kernels run at full
# width — its CPU convolutions block channels by the SIMD width (8 fp32 lanes with AVX2, 16
# with AVX-512), tensor cores take multiples of 8 — for groups wide enough to afford it:
# (at least this many channels, multiple of).
AUTO_ROUNDING = ((256, 16), (64, 8))


def rounding_unit(group: Group, round_to: int | str, align: int = 1) -> int:
    """The multiple a group's kept count is rounded to (``align``: also a multiple of this,
    e.g. M for N:M), counted in the group's own units (whole heads stay whole)."""
    if round_to == "auto":  # sized by the tensor's width: channels × channels per unit
        width = group.channels * group.granularity
        round_to = next((unit for size, unit in AUTO_ROUNDING if width >= size), 1)
    unit = math.lcm(int(round_to), align)
    return unit // math.gcd(unit, group.granularity)


def kept_count(group: Group, ratio: float, round_to: int | str, align: int = 1) -> int:
    """Channels to keep: remove ``ratio`` of them, keep the tensor size a multiple of
    ``round_to`` (and ``align``) where possible, and never empty the group."""
    channels = group.channels
    keep = channels - math.floor(ratio * channels + 1e-9)
    unit = rounding_unit(group, round_to, align)
    if unit > 1 and ratio > 0:  # ratio 0 asks to remove nothing, rounding included
        rounded = max(unit, round(keep / unit) * unit)
        keep = rounded if rounded <= channels else keep
    return max(1, min(channels, keep))


def global_counts(
    groups: list[Group], scores: list[np.ndarray], ratio: float, cap: float
) -> list[int]:
    """Channels to keep per group when all groups' channels are ranked together by their
    normalised scores; no group loses more than ``cap`` of its channels or its last one."""
    floors = [max(1, g.channels - math.floor(cap * g.channels + 1e-9)) for g in groups]
    entries = sorted(
        (float(score), index, channel)
        for index, group_scores in enumerate(scores)
        for channel, score in enumerate(group_scores)
    )
    budget = math.floor(ratio * len(entries) + 1e-9)
    keep = [g.channels for g in groups]
    for _, index, _ in entries:
        if budget == 0:
            break
        if keep[index] > floors[index]:
            keep[index] -= 1
            budget -= 1
    return keep


class SelectChannels(Pass):
    """Scores every prunable group and keeps its best channels: ``ratio`` of each group
    (uniform), or the best of all groups ranked together (``global_ranking``)."""

    name = "select-channels"

    def __init__(
        self,
        analysis: Analysis,
        ratio: float,
        criterion: str = "l1",
        aggregation: str = "sum",
        round_to: int | str = "auto",
        exclude: Sequence[str] = (),
        seed: int = 0,
        global_ranking: bool = False,
        max_group_ratio: float = 0.9,
        normalization: str = "mean",
        scores: dict[int, np.ndarray] | None = None,
        context: ObsContext | None = None,
        align: int = 1,
    ) -> None:
        """``scores``: a cache of group scores shared by selections of the same model (a
        ratio search selects many times; the scores do not depend on the ratio)."""
        if not 0.0 <= ratio < 1.0:
            raise BadInputError(f"ratio must be in [0, 1), not {ratio}")
        if round_to != "auto" and (not isinstance(round_to, int) or round_to < 1):
            raise BadInputError(f"round-to must be a positive integer or auto, not {round_to}")
        if not 0.0 < max_group_ratio < 1.0:
            raise BadInputError(f"max-group-ratio must be in (0, 1), not {max_group_ratio}")
        self.analysis = analysis
        self.ratio = ratio
        self.criterion = criterion
        self.aggregation = aggregation
        self.round_to = round_to
        self.align = align
        self.exclude = tuple(exclude)
        self.seed = seed
        self.global_ranking = global_ranking
        self.max_group_ratio = max_group_ratio
        self.normalization = normalization
        self.scores = {} if scores is None else scores
        self.context = context

    def call(self, model: Model) -> PassResult:
        groups = list(self.analysis.prunable)
        if self.ratio == 0.0 and not self.global_ranking:  # every channel stays: no scores
            return PassResult(model, changed=False, details={"plan": self._plan(
                [group_plan(g, np.arange(g.channels)) for g in groups]
            )})  # fmt: skip
        for g in groups:
            if g.id not in self.scores:
                self.scores[g.id] = score_group(
                    g,
                    model.graph,
                    self.criterion,
                    self.aggregation,
                    self.seed,
                    self.normalization,
                    self.context,
                )
        scores = [self.scores[g.id] for g in groups]
        active = [not excluded(g, self.exclude) for g in groups]
        counts: dict[int, int] = {}
        if self.global_ranking:
            ranked = [i for i, is_active in enumerate(active) if is_active]
            kept = global_counts(
                [groups[i] for i in ranked],
                [scores[i] for i in ranked],
                self.ratio,
                self.max_group_ratio,
            )
            counts = dict(zip(ranked, kept, strict=True))
        plans = []
        for index, group in enumerate(groups):
            if not active[index]:
                keep = np.arange(group.channels)
            else:
                if self.global_ranking:
                    local_ratio = 1.0 - counts[index] / group.channels
                    count = kept_count(group, local_ratio, self.round_to, self.align)
                else:
                    count = kept_count(group, self.ratio, self.round_to, self.align)
                # Highest scores stay; ties broken by channel index for determinism.
                order = np.lexsort((np.arange(group.channels), -scores[index]))
                keep = np.sort(order[:count])
            plans.append(group_plan(group, keep, scores[index]))
        return PassResult(model, changed=False, details={"plan": self._plan(plans)})

    def _plan(self, plans: list[GroupPlan]) -> Plan:
        return Plan(
            groups=plans,
            heads=self.analysis.heads,
            criterion=self.criterion,
            ratio=self.ratio,
            metadata={
                "aggregation": self.aggregation,
                "normalization": self.normalization,
                "round_to": self.round_to,
                "align": self.align,
                "exclude": list(self.exclude),
                "seed": self.seed,
                "global": self.global_ranking,
                "max_group_ratio": self.max_group_ratio,
            },
        )
