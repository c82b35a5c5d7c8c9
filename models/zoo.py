"""Shared corpus machinery plus the architectures behind the shipped models.

Kept beside ``make_models.py`` so the shipped ``.onnx`` files can be rebuilt without the test
tree; ``tests/architectures.py`` loads this file by path and re-exports everything here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pathlib
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the universal alias
from torch import nn

EXPORTERS = ("legacy13", "legacy17", "dynamo")
DYNAMO_OPSET = 18
EXPORTER_OPSET = {"legacy13": 13, "legacy17": 17, "dynamo": DYNAMO_OPSET}

InputFactory = Callable[[], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Arch:
    """One corpus entry: how to build the module and its example inputs."""

    name: str
    build: Callable[[], nn.Module]
    example_inputs: InputFactory
    tags: frozenset[str]
    dynamo_ok: bool = True
    # False where the graph bakes the batch size in, so the export must stay static.
    dynamic_batch: bool = True
    # Lowest opset the model exports at (SDPA needs 14); lower exporters are skipped.
    min_opset: int = 13


# --------------------------------------------------------------------------- helpers


def randomize_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every norm layer non-trivial stats/affine params so folding bugs show up."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(t.shape, generator=gen) * (hi - lo) + lo

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(uniform(mod.running_mean, -0.2, 0.2))
                mod.running_var.copy_(uniform(mod.running_var, 0.5, 1.5))
            elif isinstance(mod, nn.modules.instancenorm._InstanceNorm):
                if mod.running_mean is not None:
                    mod.running_mean.copy_(uniform(mod.running_mean, -0.2, 0.2))
                    mod.running_var.copy_(uniform(mod.running_var, 0.5, 1.5))
            elif isinstance(mod, nn.PReLU):
                mod.weight.copy_(uniform(mod.weight, 0.05, 0.4))
                continue
            elif not isinstance(mod, (nn.LayerNorm, nn.GroupNorm, RMSNorm)):
                continue
            weight = getattr(mod, "weight", None)
            bias = getattr(mod, "bias", None)
            if isinstance(weight, torch.Tensor):
                weight.copy_(uniform(weight, 0.5, 1.5))
            if isinstance(bias, torch.Tensor):
                bias.copy_(uniform(bias, -0.2, 0.2))
    return model


def seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Wrap a constructor so every build is seeded, randomised and in eval mode."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return randomize_norms(factory()).eval()

    return build


def image_input(channels: int = 3, size: int = 32, batch: int = 2) -> InputFactory:
    """Seeded NCHW float input factory."""

    def make() -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(1234)
        return (torch.randn(batch, channels, size, size, generator=gen),)

    return make


def token_input(vocab: int, seq: int = 8, batch: int = 2, mask: bool = False) -> InputFactory:
    """Seeded int64 token ids, optionally with a 0/1 attention mask (last tokens padded)."""

    def make() -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, vocab, (batch, seq), generator=gen, dtype=torch.int64)
        if not mask:
            return (ids,)
        attn = torch.ones(batch, seq, dtype=torch.int64)
        attn[1:, seq - 3 :] = 0  # pad the tail of the second sequence
        return ids, attn

    return make


class RMSNorm(nn.Module):
    """LLaMA RMSNorm written out the way HF does it (no fused op)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


# --------------------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Python warnings, torch logging and fd-level prints during export."""
    loggers = [logging.getLogger(n) for n in ("torch", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as devnull, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.CRITICAL)
            # fd-level redirect: the legacy exporter's C++ side prints straight to fd 2.
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
            with contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
                yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def unsupported_reason(arch: Arch, exporter: str) -> str | None:
    """Why ``arch`` cannot go through ``exporter``, or None when it should export."""
    if exporter == "dynamo" and not arch.dynamo_ok:
        return f"{arch.name}: the dynamo exporter cannot export this model"
    opset = EXPORTER_OPSET[exporter]
    if opset < arch.min_opset:
        return f"{arch.name}: needs opset >= {arch.min_opset}, {exporter} targets {opset}"
    return None


def _output_count(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    with torch.no_grad():
        out = model(*inputs)
    return len(out) if isinstance(out, (tuple, list)) else 1


def export(arch: Arch, exporter: str, path: pathlib.Path) -> pathlib.Path:
    """Export ``arch`` to ``path`` with one of ``EXPORTERS``; returns ``path``."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = arch.build()
    inputs = arch.example_inputs()
    input_names = [f"input{i}" for i in range(len(inputs))]
    output_names = [f"output{i}" for i in range(_output_count(model, inputs))]
    with _quiet():
        if exporter == "dynamo":
            shapes = None
            if arch.dynamic_batch:
                batch = torch.export.Dim("batch", min=1, max=1024)
                shapes = tuple({0: batch} for _ in inputs)
            torch.onnx.export(
                model,
                inputs,
                str(path),
                dynamo=True,
                opset_version=DYNAMO_OPSET,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=shapes,
                verbose=False,
            )
        else:
            axes = None
            if arch.dynamic_batch:
                axes = {name: {0: "batch"} for name in input_names + output_names}
            torch.onnx.export(
                model,
                inputs,
                str(path),
                dynamo=False,
                opset_version=EXPORTER_OPSET[exporter],
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=axes,
                verbose=False,
            )
    return path


# --------------------------------------------------------------------------- resnet_basic


class BasicBlock(nn.Module):
    """torchvision-style BasicBlock; 1x1 conv shortcut when shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNetBasic(nn.Module):
    """ResNet-18 shape in miniature: stem, three stages, GAP, Linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.layer3 = nn.Sequential(BasicBlock(16, 32, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- mobilenet_v2


class ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1, depthwise 3x3, linear 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU6(cin, hidden, 1))
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBNReLU6(3, 16, 3, 2),
            InvertedResidual(16, 8, 1, 1),
            InvertedResidual(8, 12, 2, 4),
            InvertedResidual(12, 12, 1, 4),
            InvertedResidual(12, 16, 2, 4),
            InvertedResidual(16, 16, 1, 4),
            ConvBNReLU6(16, 32, 1),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------- bert


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        new_shape = (*x.size()[:-1], self.heads, self.head_dim)
        return x.view(new_shape).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.split_heads(self.query(x))
        k = self.split_heads(self.key(x))
        v = self.split_heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores + mask, dim=-1)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return ctx.view((*ctx.size()[:-2], self.heads * self.head_dim))


class BertLayer(nn.Module):
    """Post-LN encoder layer with HF module boundaries."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.attention = BertSelfAttention(hidden, heads)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.intermediate = nn.Linear(hidden, ffn)
        self.output = nn.Linear(ffn, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn_out(self.attention(x, mask)))
        return self.out_norm(x + self.output(F.gelu(self.intermediate(x))))


class Bert(nn.Module):
    def __init__(
        self, vocab: int = 100, hidden: int = 32, heads: int = 4, layers: int = 2, seq: int = 8
    ) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(seq, hidden)
        self.token_type_embeddings = nn.Embedding(2, hidden)
        self.register_buffer("position_ids", torch.arange(seq).unsqueeze(0), persistent=False)
        self.emb_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(hidden, heads, 2 * hidden) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq = input_ids.size(1)
        pos = self.position_ids[:, :seq]
        token_type = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(pos)
            + self.token_type_embeddings(token_type)
        )
        x = self.emb_norm(x)
        # HF extended mask: 0 keeps, large negative drops; broadcast over heads and queries.
        ext = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, ext)
        return x, torch.tanh(self.pooler(x[:, 0]))


SHIPPED: dict[str, Arch] = {
    "resnet_basic": Arch(
        "resnet_basic",
        seeded(ResNetBasic),
        image_input(),
        frozenset({"cnn", "residual"}),
    ),
    "mobilenet_v2": Arch(
        "mobilenet_v2",
        seeded(MobileNetV2),
        image_input(),
        frozenset({"cnn", "residual", "depthwise"}),
    ),
    "bert": Arch(
        "bert",
        seeded(Bert),
        token_input(100, mask=True),
        frozenset({"transformer", "attention", "embedding", "nlp"}),
    ),
}
