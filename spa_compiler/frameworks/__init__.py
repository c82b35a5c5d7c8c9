"""Carrying a spa pruning plan back into the framework a model came from.

``spa_compiler.frameworks.torch.apply_plan`` slices a ``torch.nn.Module`` in place. Each
framework lives in its own module, imported on demand, so spa itself never needs torch.
"""

from __future__ import annotations

__all__: list[str] = []
