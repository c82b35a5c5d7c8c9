"""Analysis pass: find coupled channel groups; leaves the model unchanged."""

from __future__ import annotations

from spa_compiler.analysis import analyze
from spa_compiler.errors import PassError
from spa_compiler.ir import Model
from spa_compiler.pipeline import Pass, PassResult


class AnalyzeChannels(Pass):
    name = "analyze-channels"

    def __init__(self, heads: str = "head") -> None:
        if heads not in ("head", "dim"):
            raise PassError(f"heads must be 'head' or 'dim', not {heads!r}")
        self.heads = heads

    def call(self, model: Model) -> PassResult:
        analysis = analyze(model, heads=self.heads)
        return PassResult(model, changed=False, details={"analysis": analysis})
