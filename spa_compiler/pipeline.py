"""Pass infrastructure: a pass has one job, checks its pre/postconditions, reports change.

Modelled on onnx_ir.passes and torch.fx's pass manager: a pipeline is a list of passes run in
order, each returning a ``PassResult``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from spa_compiler.errors import PassError
from spa_compiler.ir import Model


@dataclass
class PassResult:
    model: Model
    changed: bool
    details: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class: override ``call``; optionally ``requires`` and ``ensures``."""

    name: str = "pass"

    def requires(self, model: Model) -> None:
        """Raise PassError if the model is not fit for this pass."""

    def ensures(self, model: Model) -> None:
        """Raise PassError if the pass left the model in a bad state."""

    def call(self, model: Model) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: Model) -> PassResult:
        self.requires(model)
        result = self.call(model)
        if not isinstance(result, PassResult):
            raise PassError(f"pass {self.name} returned {type(result).__name__}, not PassResult")
        self.ensures(result.model)
        return result


@dataclass
class PipelineResult:
    model: Model
    changed: bool
    results: list[tuple[str, PassResult, float]]


def run_passes(model: Model, passes: Sequence[Pass]) -> PipelineResult:
    """Run passes in order; each sees the previous one's output model."""
    results: list[tuple[str, PassResult, float]] = []
    changed = False
    for compiler_pass in passes:
        started = time.perf_counter()
        result = compiler_pass(model)
        results.append((compiler_pass.name, result, time.perf_counter() - started))
        model = result.model
        changed = changed or result.changed
    return PipelineResult(model=model, changed=changed, results=results)
