"""``nn.Linear`` layers as N:M sparse kernels in a PyTorch model: ``NMLinear`` holds the
compressed weight (``NMWeight``) and runs ``nm_linear``; ``sparsify_linears`` swaps a
module's ``nn.Linear`` children for it in place, for inference (the kernels have no backward).

    model = sparsify_linears(model.half().cuda().eval(), n=2, m=4, prune=True)
    with torch.no_grad():
        logits = model(tokens)

The weight is read compressed — for fp16 2:4, 9/16 of the dense bytes — which is where a
decode step's time goes. ``prune=False`` takes weights already N:M sparse (``spa compile
--nm 2:4`` made them so, with OBS weight updates) and refuses any that are not.

Save and load a sparsified model by its ``state_dict`` (the compressed buffers), into a model
sparsified the same way: ``torch.save(model)`` pickles the ``NMWeight`` objects, which
``torch.load``'s default ``weights_only=True`` refuses.
"""

from __future__ import annotations

import fnmatch
import warnings

import torch
from spa_compiler.kernels.nm_layout import NMWeight
from spa_compiler.kernels.nm_matmul import ACTIVATIONS, DENSE_FROM_M, nm_linear
from torch import nn

from spa_compiler.errors import SpaWarning


class NMLinear(nn.Module):
    """``y = act(x · Wᵀ + b)`` with W [out_features, in_features] N:M sparse along in_features,
    stored compressed; x of any shape [..., in_features]."""

    def __init__(
        self,
        weight: NMWeight,
        bias: torch.Tensor | None = None,
        activation: str = "none",
        dense_from_m: int = DENSE_FROM_M,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, not {activation!r}")
        self.compressed = weight
        self.in_features, self.out_features = weight.k, weight.rows
        self.register_buffer("values", weight.values, persistent=True)
        self.register_buffer("words", weight.words, persistent=True)
        self.register_buffer("bias", bias, persistent=True)
        self.activation = activation
        self.dense_from_m = dense_from_m

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, n: int = 2, m: int = 4, prune: bool = False
    ) -> NMLinear:
        """From a dense ``nn.Linear``: its weight must be N:M sparse along in_features, or is
        made so by magnitude (``prune=True``)."""
        weight = linear.weight.detach()
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(NMWeight.from_dense(weight, n, m, prune=prune), bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        values, words = state_dict.get(f"{prefix}values"), state_dict.get(f"{prefix}words")
        if values is not None and words is not None:
            # the buffers are copied in place: check the format first (NMWeight refuses words
            # whose positions do not ascend inside a group, and words that are not int32)
            old = self.compressed
            NMWeight(values.contiguous(), words.contiguous(), old.n, old.m, old.k)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): the NMWeight follows
        super()._apply(fn, recurse)
        old = self.compressed
        self.compressed = NMWeight(self.values, self.words, old.n, old.m, old.k)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            # the kernels have no backward: a result cut from the graph would train nothing
            # behind this layer without a word
            raise RuntimeError(
                "NMLinear is for inference (the N:M kernels have no backward): run it under "
                "torch.no_grad() or torch.inference_mode(), or train the dense model"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., {self.in_features}], not {list(x.shape)}")
        rows = x.reshape(-1, self.in_features)
        y = nm_linear(rows, self.compressed, self.bias, self.activation, self.dense_from_m)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, pattern={self.compressed.n}:{self.compressed.m}"
        )


# Modules whose forward reads their Linear children's ``.weight`` itself (MultiheadAttention's
# out_proj; TransformerEncoderLayer's linear1/linear2 in its fast-path check): an NMLinear has
# none, so their children stay dense.
READS_LINEAR_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def sparsify_linears(
    module: nn.Module,
    n: int = 2,
    m: int = 4,
    prune: bool = False,
    exclude: tuple[str, ...] = (),
) -> nn.Module:
    """Replace every ``nn.Linear`` inside ``module`` (names not matching an ``exclude`` glob,
    in_features a multiple of M, not a child of ``READS_LINEAR_WEIGHTS``) by an ``NMLinear``
    on the same device and dtype — one for a Linear registered under several names; return
    ``module``. ``prune=False``: the weights must already be N:M sparse; one that is not is
    a ValueError and leaves the module as it was. Linear layers left dense for a reason other
    than ``exclude`` are named in a SpaWarning. A ``module`` that is itself an ``nn.Linear``
    comes back as its ``NMLinear`` (it cannot be replaced in place)."""
    if isinstance(module, nn.Linear):
        if module.in_features % m:
            raise ValueError(f"in_features {module.in_features} is not a multiple of M = {m}")
        return NMLinear.from_linear(module, n, m, prune=prune)
    swaps, made, skipped = [], {}, []
    for name, child in module.named_modules():
        # every name a child is registered under (named_children yields a shared one once)
        for attribute, layer in list(child._modules.items()):
            full = f"{name}.{attribute}" if name else attribute
            if not isinstance(layer, nn.Linear) or any(fnmatch.fnmatch(full, p) for p in exclude):
                continue
            why = None
            if layer.in_features % m:
                why = f"in_features {layer.in_features} not a multiple of {m}"
            elif isinstance(child, READS_LINEAR_WEIGHTS):
                why = f"{type(child).__name__} reads its weight directly"
            if why:
                skipped.append(f"{full} ({why})")
                continue
            if id(layer) not in made:  # a Linear shared by two paths stays one module
                try:
                    made[id(layer)] = NMLinear.from_linear(layer, n, m, prune=prune)
                except ValueError as error:
                    raise ValueError(f"{full}: {error}") from None
            swaps.append((child, attribute, made[id(layer)]))
    for child, attribute, replacement in swaps:
        setattr(child, attribute, replacement)
    if skipped:
        warnings.warn(
            "sparsify_linears left Linear layers dense: " + ", ".join(dict.fromkeys(skipped)),
            SpaWarning,
            stacklevel=2,
        )
    return module


__all__ = ["NMLinear", "sparsify_linears"]
