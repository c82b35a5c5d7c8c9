"""OBS compensation: before channels are cut, refit every linear consumer of a pruned group
on the channels it keeps, in least squares under its input's second moment H, and move the
removed channels' mean contribution into its bias (see ``spa_compiler.obs``).

Runs on the unpruned weights, so the rewrite that follows slices compensated values. Where a
consumer's removed columns are all zero the refit is zero and nothing changes (the exactness
oracle's premise holds). Consumers without moments are left as they are.
"""

from __future__ import annotations

import numpy as np

from spa_compiler.channel_graph import Group
from spa_compiler.ir import Model
from spa_compiler.linear_layers import LayerIndex
from spa_compiler.obs import Moments, refit
from spa_compiler.pipeline import Pass, PassResult
from spa_compiler.plan import Plan, removed_indices


class CompensateWeights(Pass):
    name = "compensate-weights"

    def __init__(self, plan: Plan, groups: dict[int, Group], moments: dict[str, Moments]) -> None:
        self.plan, self.groups, self.moments = plan, groups, moments

    def call(self, model: Model) -> PassResult:
        removed = removed_indices(self.plan, self.groups, consumers_only=True)
        consumers = {}
        for planned in self.plan.groups:
            if planned.removed:
                for member in self.groups[planned.group].consumers:
                    consumers.setdefault((member.tensor, member.axis), member)
        index = LayerIndex(model.graph)
        refitted = biases = 0
        for key, member in sorted(consumers.items()):
            layer = index.find(member)
            stats = None if layer is None else self.moments.get(layer.activation.name)
            if layer is None or stats is None or stats.features != layer.features:
                continue
            if not stats.usable:
                continue
            features = np.array(sorted(removed[key]), dtype=np.int64)
            with_bias = layer.bias is not None
            rows = layer.rows()
            if with_bias:
                rows = np.hstack([rows, np.zeros((rows.shape[0], 1))])
            delta = refit(rows, stats.hessian(with_bias), features)
            if not np.any(delta) or not np.isfinite(delta).all():
                continue
            updated = rows[:, : layer.features] + delta[:, : layer.features]
            layer.weight.values = layer.from_rows(updated)
            refitted += 1
            if with_bias:
                shift = delta[:, layer.features].reshape(layer.outputs, -1).sum(axis=1)
                bias = np.asarray(layer.bias.values)
                new_bias = bias.reshape(-1) + layer.bias_sign * shift
                layer.bias.values = new_bias.reshape(bias.shape).astype(bias.dtype)
                biases += 1
        return PassResult(
            model,
            changed=refitted > 0,
            details={"refitted": refitted, "biases": biases},
        )
