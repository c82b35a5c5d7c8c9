"""Registry of tiny hand-written PyTorch architectures for the channel-coupling tests.

The machinery (``Arch``, ``export``, ``EXPORTERS``) and the three architectures behind the
shipped models live in ``models/zoo.py``; this module loads that file by path and adds the rest.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 - the universal alias
from torch import nn


def _load_zoo() -> types.ModuleType:
    name = "spa_models_zoo"
    if name in sys.modules:
        return sys.modules[name]
    path = pathlib.Path(__file__).resolve().parent.parent / "models" / "zoo.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before exec so dataclasses can resolve the module while it loads.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_zoo = _load_zoo()
Arch = _zoo.Arch
EXPORTERS = _zoo.EXPORTERS
RMSNorm = _zoo.RMSNorm
export = _zoo.export
image_input = _zoo.image_input
InputFactory = _zoo.InputFactory
seeded = _zoo.seeded
token_input = _zoo.token_input
unsupported_reason = _zoo.unsupported_reason
EXPORTER_OPSET = _zoo.EXPORTER_OPSET

__all__ = ["ARCHITECTURES", "EXPORTERS", "EXPORTER_OPSET", "Arch", "export", "unsupported_reason"]


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


def conv_bn_act(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type = nn.ReLU
) -> nn.Sequential:
    return nn.Sequential(*conv_bn(cin, cout, k, stride, groups), act())


def seq_input(*shapes: tuple[int, ...]) -> InputFactory:
    """Seeded float inputs of the given shapes."""

    def make() -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(1234)
        return tuple(torch.randn(*s, generator=gen) for s in shapes)

    return make


# --------------------------------------------------------------------------- CNNs


class Bottleneck(nn.Module):
    """ResNet bottleneck (expansion 4); ``groups`` > 1 makes it a ResNeXt block."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, groups: int = 1, out: int = 0):
        super().__init__()
        cout = out or width * self.expansion
        self.conv1 = conv_bn(cin, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride, groups)
        self.conv3 = conv_bn(width, cout, 1)
        self.downsample = (
            conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        return F.relu(self.conv3(out) + self.downsample(x))


class ResNetBottleneck(nn.Module):
    def __init__(self, groups: int = 1, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn_act(3, 16, 3, 2), nn.MaxPool2d(3, 2, 1))
        out1, out2 = 16, 32
        self.layer1 = nn.Sequential(
            Bottleneck(16, width, 1, groups, out1), Bottleneck(out1, width, 1, groups, out1)
        )
        self.layer2 = Bottleneck(out1, width * 2, 2, groups, out2)
        self.fc = nn.Linear(out2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return torch.cat([x, out], 1)


class DenseNet(nn.Module):
    """Pre-activation dense blocks (BN before conv, so BN survives export)."""

    def __init__(self, growth: int = 4) -> None:
        super().__init__()
        self.stem = conv_bn_act(3, 8, 3, 1)
        self.block1 = nn.Sequential(*(DenseLayer(8 + i * growth, growth) for i in range(3)))
        c = 8 + 3 * growth
        self.transition = nn.Sequential(
            nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)
        )
        c //= 2
        self.block2 = nn.Sequential(*(DenseLayer(c + i * growth, growth) for i in range(2)))
        c += 2 * growth
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.transition(self.block1(self.stem(x))))
        x = F.relu(self.norm(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    """Conv-based SE as in MobileNetV3 / EfficientNet."""

    def __init__(self, c: int, reduced: int, act: type, gate: type) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, reduced, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(reduced, c, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class MBv3Block(nn.Module):
    def __init__(self, cin: int, exp: int, cout: int, k: int, stride: int, se: bool) -> None:
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(conv_bn_act(cin, exp, 1, act=nn.Hardswish))
        layers.append(conv_bn_act(exp, exp, k, stride, groups=exp, act=nn.Hardswish))
        if se:
            layers.append(SqueezeExcite(exp, _make_div(exp // 4), nn.ReLU, nn.Hardsigmoid))
        layers.append(conv_bn(exp, cout, 1))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


def _make_div(v: int, divisor: int = 4) -> int:
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class MobileNetV3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(3, 16, 3, 2, act=nn.Hardswish),
            MBv3Block(16, 16, 16, 3, 2, True),
            MBv3Block(16, 32, 24, 3, 1, False),
            MBv3Block(24, 48, 24, 5, 1, True),
            MBv3Block(24, 64, 32, 5, 2, True),
            conv_bn_act(32, 48, 1, act=nn.Hardswish),
        )
        self.classifier = nn.Sequential(
            nn.Linear(48, 64), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit; stride 1 splits channels, stride 2 runs both branches."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = cout // 2
        b2_in = cin if stride > 1 else branch
        if stride > 1:
            self.branch1 = nn.Sequential(
                conv_bn(cin, cin, 3, stride, groups=cin), conv_bn_act(cin, branch, 1)
            )
        self.branch2 = nn.Sequential(
            conv_bn_act(b2_in, branch, 1),
            conv_bn(branch, branch, 3, stride, groups=branch),
            conv_bn_act(branch, branch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn_act(3, 8, 3, 2), nn.MaxPool2d(3, 2, 1))
        self.stage2 = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1))
        self.stage3 = nn.Sequential(ShuffleUnit(16, 32, 2), ShuffleUnit(32, 32, 1))
        self.conv5 = conv_bn_act(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stage3(self.stage2(self.stem(x))))
        return self.fc(x.mean([2, 3]))


class MBConv(nn.Module):
    """EfficientNet MBConv: expand, depthwise, SE(SiLU/Sigmoid), project."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int) -> None:
        super().__init__()
        exp = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(cin, exp, 1, act=nn.SiLU))
        layers += [
            conv_bn_act(exp, exp, k, stride, groups=exp, act=nn.SiLU),
            SqueezeExcite(exp, max(1, cin // 4), nn.SiLU, nn.Sigmoid),
            conv_bn(exp, cout, 1),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


class EfficientNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(3, 16, 3, 2, act=nn.SiLU),
            MBConv(16, 8, 1, 3, 1),
            MBConv(8, 16, 4, 3, 2),
            MBConv(16, 16, 4, 3, 1),
            MBConv(16, 24, 4, 5, 2),
            conv_bn_act(24, 32, 1, act=nn.SiLU),
        )
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class LayerNorm2d(nn.LayerNorm):
    """Channels-first LayerNorm via permutes, as in ConvNeXt downsampling layers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # Real init is 1e-6, which would hide the branch from numerical checks.
        self.gamma = nn.Parameter(0.5 + torch.rand(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, 4), LayerNorm2d(16, eps=1e-6))
        self.stage1 = ConvNeXtBlock(16)
        self.down = nn.Sequential(LayerNorm2d(16, eps=1e-6), nn.Conv2d(16, 32, 2, 2))
        self.stage2 = ConvNeXtBlock(32)
        self.norm = nn.LayerNorm(32, eps=1e-6)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean([-2, -1])))


class InceptionModule(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int):
        super().__init__()
        self.b1 = conv_bn_act(cin, c1, 1)
        self.b2 = nn.Sequential(conv_bn_act(cin, c3r, 1), conv_bn_act(c3r, c3, 3))
        self.b3 = nn.Sequential(conv_bn_act(cin, c5r, 1), conv_bn_act(c5r, c5, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn_act(cin, cp, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class Inception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn_act(3, 16, 3, 2))
        self.inc1 = InceptionModule(16, 8, 8, 12, 4, 6, 6)  # -> 32
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.inc2 = InceptionModule(32, 8, 8, 8, 4, 8, 8)  # -> 32
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inc2(self.pool(self.inc1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_act(cin, cout), conv_bn_act(cout, cout))


class UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc1 = double_conv(3, 8)
        self.enc2 = double_conv(8, 16)
        self.mid = double_conv(16, 32)
        self.up2 = nn.ConvTranspose2d(32, 16, 2, 2)
        self.dec2 = double_conv(32, 16)
        self.up1 = nn.ConvTranspose2d(16, 8, 2, 2)
        self.dec1 = double_conv(16, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.out(d1)


class FPNYolo(nn.Module):
    """Two-scale YOLO-ish detector: split/chunk, nearest upsampling, concat, head convs."""

    def __init__(self, anchors: int = 3, classes: int = 3) -> None:
        super().__init__()
        act = nn.SiLU
        self.stem = conv_bn_act(3, 8, 3, 2, act=act)  # 16x16
        self.c3 = conv_bn_act(8, 16, 3, 2, act=act)  # 8x8
        self.c4 = conv_bn_act(16, 32, 3, 2, act=act)  # 4x4
        self.lateral = conv_bn_act(32, 32, 1, act=act)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = conv_bn_act(16 + 12, 16, 3, act=act)
        no = anchors * (5 + classes)
        self.head_p3 = nn.Conv2d(16, no, 1)
        self.head_p4 = nn.Conv2d(20, no, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p3 = self.c3(self.stem(x))
        p4 = self.c4(p3)
        lat = self.lateral(p4)
        a, b = torch.split(lat, [12, 20], dim=1)  # uneven split on purpose
        a1, a2 = a.chunk(2, 1)
        up = torch.cat([self.up(a1), F.interpolate(a2, scale_factor=2.0, mode="nearest")], 1)
        f3 = self.fuse(torch.cat([up, p3], 1))
        return self.head_p3(f3), self.head_p4(b)


class VGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(3, 8), nn.MaxPool2d(2),
            conv_bn_act(8, 16), conv_bn_act(16, 16), nn.MaxPool2d(2),
            conv_bn_act(16, 32), nn.MaxPool2d(2),
        )  # fmt: skip
        # Flatten merges C*H*W = 32*4*4, so channel pruning must step in blocks of 16.
        self.classifier = nn.Sequential(
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 4, 8, 8), Fire(16, 4, 8, 8), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 8, 12, 12),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Conv2d(24, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


class GhostModule(nn.Module):
    """Primary conv + cheap depthwise-multiplier conv, concat, slice back to ``oup``."""

    def __init__(self, inp: int, oup: int, ratio: int = 3, relu: bool = True) -> None:
        super().__init__()
        self.oup = oup
        init = math.ceil(oup / ratio)
        act: type = nn.ReLU if relu else nn.Identity
        self.primary = conv_bn_act(inp, init, 1, act=act)
        self.cheap = conv_bn_act(init, init * (ratio - 1), 3, groups=init, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        out = torch.cat([x1, self.cheap(x1)], dim=1)
        return out[:, : self.oup, :, :]


class GhostBottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int, se: bool) -> None:
        super().__init__()
        self.ghost1 = GhostModule(cin, mid, relu=True)
        self.dw = conv_bn(mid, mid, 3, stride, groups=mid) if stride > 1 else nn.Identity()
        self.se = SqueezeExcite(mid, mid // 4, nn.ReLU, nn.Hardsigmoid) if se else nn.Identity()
        self.ghost2 = GhostModule(mid, cout, relu=False)
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                conv_bn(cin, cin, 3, stride, groups=cin), conv_bn(cin, cout, 1)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ghost2(self.se(self.dw(self.ghost1(x)))) + self.shortcut(x)


class GhostNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_act(3, 16, 3, 2)
        self.blocks = nn.Sequential(
            GhostBottleneck(16, 16, 16, 1, False),
            GhostBottleneck(16, 32, 20, 2, True),
            GhostBottleneck(20, 40, 20, 1, True),
        )
        self.fc = nn.Linear(20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class YoloBottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = conv_bn_act(c, c, 3, act=nn.SiLU)
        self.cv2 = conv_bn_act(c, c, 3, act=nn.SiLU)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """YOLOv8 CSP block: chunk, chained bottlenecks, concat everything, 1x1 fuse."""

    def __init__(self, cin: int, cout: int, n: int = 2) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1 = conv_bn_act(cin, 2 * self.c, 1, act=nn.SiLU)
        self.cv2 = conv_bn_act((2 + n) * self.c, cout, 1, act=nn.SiLU)
        self.m = nn.ModuleList(YoloBottleneck(self.c) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C3(nn.Module):
    """YOLOv5 CSP block: two 1x1 paths, bottlenecks on one, concat, 1x1 fuse."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        c = cout // 2
        self.cv1 = conv_bn_act(cin, c, 1, act=nn.SiLU)
        self.cv2 = conv_bn_act(cin, c, 1, act=nn.SiLU)
        self.m = nn.Sequential(YoloBottleneck(c), YoloBottleneck(c, shortcut=False))
        self.cv3 = conv_bn_act(2 * c, cout, 1, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))


class CSPNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_act(3, 16, 3, 2, act=nn.SiLU)
        self.c2f = C2f(16, 16)
        self.down = conv_bn_act(16, 32, 3, 2, act=nn.SiLU)
        self.c3 = C3(32, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c3(self.down(self.c2f(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Bottle2neck(nn.Module):
    """Res2Net block: split into scales, hierarchical adds, concat, 1x1 + residual."""

    def __init__(self, c: int, width: int = 4, scale: int = 4) -> None:
        super().__init__()
        self.width = width
        self.conv1 = conv_bn_act(c, width * scale, 1)
        self.convs = nn.ModuleList(conv_bn_act(width, width, 3) for _ in range(scale - 1))
        self.conv3 = conv_bn(width * scale, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spx = torch.split(self.conv1(x), self.width, 1)
        outs = []
        sp = spx[0]
        for i, conv in enumerate(self.convs):
            sp = spx[i] if i == 0 else sp + spx[i]
            sp = conv(sp)
            outs.append(sp)
        outs.append(spx[-1])
        return F.relu(self.conv3(torch.cat(outs, 1)) + x)


class Res2Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_act(3, 16, 3, 2)
        self.blocks = nn.Sequential(Bottle2neck(16), Bottle2neck(16, width=6, scale=3))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class SELayer(nn.Module):
    """Linear-based SE (SENet original): GAP -> fc -> fc -> sigmoid -> view -> scale."""

    def __init__(self, c: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(c, c // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(c // reduction, c, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.size()
        y = self.fc(F.adaptive_avg_pool2d(x, 1).view(b, c)).view(b, c, 1, 1)
        return x * y.expand_as(x)


class SEBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn_act(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3)
        self.se = SELayer(cout)
        self.down = conv_bn(cin, cout, 1, stride) if stride > 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.se(self.conv2(self.conv1(x))) + self.down(x))


class SENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_act(3, 16, 3, 2)
        self.blocks = nn.Sequential(SEBasicBlock(16, 16), SEBasicBlock(16, 32, 2))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class NormCNN(nn.Module):
    """Conv stack with a pluggable norm/activation and one residual add."""

    def __init__(self, norm: Callable[[int], nn.Module], act: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 2, 1)
        self.n1, self.a1 = norm(16), act(16)
        self.conv2 = nn.Conv2d(16, 16, 3, 1, 1)
        self.n2, self.a2 = norm(16), act(16)
        self.conv3 = nn.Conv2d(16, 32, 3, 2, 1)
        self.n3, self.a3 = norm(32), act(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a1(self.n1(self.conv1(x)))
        x = x + self.a2(self.n2(self.conv2(x)))
        x = self.a3(self.n3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def _groupnorm_cnn() -> nn.Module:
    return NormCNN(lambda c: nn.GroupNorm(4, c), lambda c: nn.ReLU())


def _instancenorm_cnn() -> nn.Module:
    return NormCNN(lambda c: nn.InstanceNorm2d(c, affine=True), lambda c: nn.ReLU())


def _prelu_cnn() -> nn.Module:
    return NormCNN(nn.BatchNorm2d, lambda c: nn.PReLU(num_parameters=c))


class TemporalBlock(nn.Module):
    """TCN block: causal dilated Conv1d (pad + chomp), residual with 1x1 when needed."""

    def __init__(self, cin: int, cout: int, dilation: int, k: int = 3) -> None:
        super().__init__()
        self.pad = (k - 1) * dilation
        self.conv1 = nn.Conv1d(cin, cout, k, padding=self.pad, dilation=dilation)
        self.conv2 = nn.Conv1d(cout, cout, k, padding=self.pad, dilation=dilation)
        self.down = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv1(x)[:, :, : -self.pad])
        y = F.relu(self.conv2(y)[:, :, : -self.pad])
        return F.relu(y + self.down(x))


class TCN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            TemporalBlock(8, 16, 1), TemporalBlock(16, 16, 2), TemporalBlock(16, 32, 4)
        )
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(x)[:, :, -1])


class SeparableConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )


class XceptionBlock(nn.Module):
    def __init__(self, cin: int, cout: int, reps: int, stride: int, start_relu: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = cin
        for i in range(reps):
            if i > 0 or start_relu:
                layers.append(nn.ReLU())
            layers.append(SeparableConv(c, cout))
            c = cout
        if stride > 1:
            layers.append(nn.MaxPool2d(3, stride, 1))
        self.rep = nn.Sequential(*layers)
        self.skip = conv_bn(cin, cout, 1, stride) if stride > 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rep(x) + self.skip(x)


class Xception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn_act(3, 8, 3, 2), conv_bn_act(8, 16, 3))
        self.entry = XceptionBlock(16, 24, 2, 2, start_relu=False)
        self.middle = XceptionBlock(24, 24, 3, 1, start_relu=True)
        self.exit = nn.Sequential(SeparableConv(24, 32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.exit(self.middle(self.entry(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class PixelShuffleSR(nn.Module):
    """ESPCN-style super-resolution: conv features then PixelShuffle (DepthToSpace)."""

    def __init__(self, r: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 5, padding=2), nn.Tanh(), nn.Conv2d(16, 8, 3, padding=1), nn.Tanh()
        )
        self.to_sub = nn.Conv2d(8, 3 * r * r, 3, padding=1)
        self.shuffle = nn.PixelShuffle(r)
        self.refine = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.refine(self.shuffle(self.to_sub(self.body(x))))


class ConvTransposeGrouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = conv_bn_act(3, 16, 3, 2)
        self.up_grouped = nn.ConvTranspose2d(16, 16, 4, 2, 1, groups=2)
        self.bn = nn.BatchNorm2d(16)
        self.up_dw = nn.ConvTranspose2d(16, 16, 3, 1, 1, groups=16)
        self.up_mult = nn.ConvTranspose2d(16, 8, 3, 1, 1, groups=4, bias=False)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.up_grouped(self.enc(x))))
        return self.out(F.relu(self.up_mult(F.relu(self.up_dw(x)))))


class ASPP(nn.Module):
    """DeepLab-style atrous pyramid with image pooling and bilinear upsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(conv_bn_act(3, 16, 3, 2), conv_bn_act(16, 16, 3, 2))
        self.b0 = conv_bn_act(16, 8, 1)
        self.b1 = nn.Sequential(nn.Conv2d(16, 8, 3, padding=2, dilation=2), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(16, 8, 3, padding=3, dilation=3), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 8, 1), nn.ReLU())
        self.project = conv_bn_act(32, 16, 1)
        self.cls = nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        pooled = F.interpolate(self.pool(f), size=f.shape[-2:], mode="bilinear")
        y = self.project(torch.cat([self.b0(f), self.b1(f), self.b2(f), pooled], 1))
        return F.interpolate(self.cls(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


class CBAM(nn.Module):
    """Channel attention (avg+max MLP) then spatial attention over channel-reduced maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv_bn_act(3, 16, 3, 2)
        self.mlp = nn.Sequential(nn.Conv2d(16, 4, 1), nn.ReLU(), nn.Conv2d(4, 16, 1))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)
        self.conv2 = conv_bn_act(16, 16, 3, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        ca = self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1))
        x = x * torch.sigmoid(ca)
        sa = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        x = x * torch.sigmoid(self.spatial(sa))
        return self.fc(self.conv2(x).mean((2, 3)))


# --------------------------------------------------------------------------- MLP / RNN


class MLP(nn.Module):
    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        norm = nn.BatchNorm1d if batchnorm else (lambda c: nn.Identity())
        self.net = nn.Sequential(
            nn.Linear(32, 64), norm(64), nn.ReLU(),
            nn.Linear(64, 48), norm(48), nn.ReLU(),
            nn.Linear(48, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LSTMModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 32, num_layers=2, batch_first=True)
        self.fc = nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(ids))
        return self.fc(out[:, -1])


class GRUModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 16)
        self.gru = nn.GRU(16, 24, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(torch.tanh(self.proj(x)))
        return self.fc(out.mean(1))


# --------------------------------------------------------------------------- transformers


class ViTAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, dim: int = 32, patch: int = 4, size: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        n = (size // patch) ** 2
        # Real init is zeros / tiny; random so the adds matter numerically.
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.5)
        self.blocks = nn.Sequential(*(ViTBlock(dim, 4) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x[:, 0])


class Conv1D(nn.Module):
    """HF GPT-2 Conv1D: a transposed Linear computed with addmm on the flattened input."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.size()[:-1], self.nf)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2Attention(nn.Module):
    def __init__(self, dim: int, heads: int, ctx: int) -> None:
        super().__init__()
        self.heads, self.dim = heads, dim
        self.head_dim = dim // heads
        tril = torch.tril(torch.ones(ctx, ctx, dtype=torch.bool)).view(1, 1, ctx, ctx)
        self.register_buffer("bias", tril, persistent=False)
        self.c_attn = Conv1D(3 * dim, dim)
        self.c_proj = Conv1D(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view((*x.size()[:-1], self.heads, self.head_dim)).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.dim, dim=2)
        q, k, v = self._split(q), self._split(k), self._split(v)
        w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        s = q.size(-2)
        causal = self.bias[:, :, :s, :s]
        w = torch.where(causal, w, torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype))
        out = torch.matmul(torch.softmax(w, dim=-1), v).permute(0, 2, 1, 3).contiguous()
        return self.c_proj(out.view((*out.size()[:-2], self.dim)))


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2 tanh GELU, written out as HF's NewGELUActivation."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class GPT2Block(nn.Module):
    def __init__(self, dim: int, heads: int, ctx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = GPT2Attention(dim, heads, ctx)
        self.ln_2 = nn.LayerNorm(dim)
        self.c_fc = Conv1D(4 * dim, dim)
        self.c_proj = Conv1D(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(gelu_new(self.c_fc(self.ln_2(x))))


class GPT2(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, ctx: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(ctx, dim)
        self.h = nn.ModuleList(GPT2Block(dim, 4, ctx) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in HF

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.size(1), dtype=torch.long).unsqueeze(0)
        x = self.wte(ids) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """HF repeat_kv: (b, kv, s, d) -> (b, kv * n_rep, s, d) via expand + reshape."""
    b, kv, s, d = x.shape
    if n_rep == 1:
        return x
    x = x[:, :, None, :, :].expand(b, kv, n_rep, s, d)
    return x.reshape(b, kv * n_rep, s, d)


class LlamaAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, ctx: int) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        freqs = torch.outer(torch.arange(ctx).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        mask = torch.full((ctx, ctx), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.cos[:s], self.sin[:s]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        n_rep = self.heads // self.kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim) + self.mask[:s, :s]
        out = torch.matmul(torch.softmax(w.float(), dim=-1).to(q.dtype), v)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class LlamaMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, dim: int, ctx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = LlamaAttention(dim, 4, 2, ctx)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = LlamaMLP(dim, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, ctx: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(LlamaLayer(dim, ctx) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 32), nn.GELU(), nn.Linear(32, tokens))
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MLPMixer(nn.Module):
    def __init__(self, dim: int = 32, patch: int = 4, size: int = 16) -> None:
        super().__init__()
        tokens = (size // patch) ** 2
        self.stem = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(MixerBlock(tokens, dim), MixerBlock(tokens, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


class MultiHeadAttention(nn.Module):
    """Hand-written MHA with separate q/k/v projections; keys/values may come from memory."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = (
            self._split(self.q_proj(x)),
            self._split(self.k_proj(kv)),
            self._split(self.v_proj(kv)),
        )
        w = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if mask is not None:
            w = w + mask
        out = torch.matmul(torch.softmax(w, dim=-1), v)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, c))


class DecoderLayer(nn.Module):
    """Post-LN decoder layer: causal self-attention, cross-attention to memory, ReLU FFN."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MultiHeadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Linear(ffn, dim))
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, x, mask))
        x = self.norm2(x + self.cross_attn(x, memory))
        return self.norm3(x + self.ffn(x))


class TransformerDecoder(nn.Module):
    def __init__(self, dim: int = 32, seq: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, 4, 64) for _ in range(2))
        self.register_buffer("mask", torch.full((seq, seq), -1e9).triu(1), persistent=False)
        self.out = nn.Linear(dim, 16)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            tgt = layer(tgt, memory, self.mask)
        return self.out(tgt)


class TorchTransformerDecoder(nn.Module):
    """torch.nn.TransformerDecoder (nn.MultiheadAttention with packed in_proj, SDPA inside)."""

    def __init__(self, dim: int = 32, seq: int = 8) -> None:
        super().__init__()
        layer = nn.TransformerDecoderLayer(
            dim, 4, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers=2)
        mask = torch.full((seq, seq), float("-inf")).triu(1)
        self.register_buffer("tgt_mask", mask, persistent=False)
        self.out = nn.Linear(dim, 16)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        # tgt_is_causal=True skips the data-dependent mask check torch.export cannot trace.
        y = self.decoder(tgt, memory, tgt_mask=self.tgt_mask, tgt_is_causal=True)
        return self.out(y)


class EinsumAttention(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        return x.view(b, s, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        w = torch.einsum("bhqd,bhkd->bhqk", q, k) * (c // self.heads) ** -0.5
        out = torch.einsum("bhqk,bhkd->bhqd", w.softmax(-1), v)
        x = self.norm(x + self.o(out.transpose(1, 2).reshape(b, s, c)))
        return x + self.ffn(x)


class SDPATransformer(nn.Module):
    """Pre-LN block using F.scaled_dot_product_attention with a fused qkv Linear."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 64), nn.GELU(approximate="tanh"), nn.Linear(64, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, -1).unbind(2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(out.transpose(1, 2).reshape(b, s, c))
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------- registry


def _arch(
    name: str,
    factory: Callable[[], nn.Module],
    inputs: InputFactory,
    tags: set[str],
    **kw: object,
) -> Arch:
    return Arch(name, seeded(factory), inputs, frozenset(tags), **kw)


_IMG = image_input()
_IMG16 = image_input(size=16)

_ENTRIES: list[Arch] = [
    *_zoo.SHIPPED.values(),
    _arch("resnet_bottleneck", ResNetBottleneck, _IMG, {"cnn", "residual", "bottleneck"}),
    _arch("densenet", DenseNet, _IMG, {"cnn", "concat", "dense"}),
    _arch("mobilenet_v3", MobileNetV3, _IMG, {"cnn", "residual", "depthwise", "se"}),
    _arch(
        "resnext",
        lambda: ResNetBottleneck(groups=4, width=8),
        _IMG,
        {"cnn", "residual", "grouped"},
    ),
    _arch("shufflenet_v2", ShuffleNetV2, _IMG, {"cnn", "split", "concat", "shuffle", "depthwise"}),
    _arch("efficientnet", EfficientNet, _IMG, {"cnn", "residual", "depthwise", "se"}),
    _arch("convnext", ConvNeXt, _IMG, {"cnn", "residual", "depthwise", "layernorm", "permute"}),
    _arch("inception", Inception, _IMG, {"cnn", "concat", "branches"}),
    _arch("unet", UNet, _IMG, {"cnn", "concat", "encoder_decoder", "conv_transpose"}),
    _arch("fpn_yolo", FPNYolo, _IMG, {"cnn", "split", "concat", "upsample", "multi_output"}),
    _arch("vgg", VGG, _IMG, {"cnn", "flatten"}),
    _arch("squeezenet", SqueezeNet, _IMG, {"cnn", "concat"}),
    _arch("ghostnet", GhostNet, _IMG, {"cnn", "concat", "slice", "depthwise", "se", "residual"}),
    _arch("csp", CSPNet, _IMG, {"cnn", "split", "concat", "residual"}),
    _arch("res2net", Res2Net, _IMG, {"cnn", "split", "concat", "residual"}),
    _arch("senet", SENet, _IMG, {"cnn", "residual", "se"}),
    _arch("groupnorm_cnn", _groupnorm_cnn, _IMG, {"cnn", "groupnorm", "residual"}),
    _arch("instancenorm_cnn", _instancenorm_cnn, _IMG, {"cnn", "instancenorm", "residual"}),
    _arch("prelu_cnn", _prelu_cnn, _IMG, {"cnn", "prelu", "residual"}),
    _arch("tcn_conv1d", TCN, seq_input((2, 8, 32)), {"cnn", "conv1d", "residual", "slice"}),
    _arch("xception", Xception, _IMG, {"cnn", "residual", "depthwise"}),
    _arch("pixel_shuffle_sr", PixelShuffleSR, _IMG16, {"cnn", "pixel_shuffle", "super_resolution"}),
    _arch(
        "conv_transpose_grouped",
        ConvTransposeGrouped,
        _IMG16,
        {"cnn", "conv_transpose", "grouped", "depthwise"},
    ),
    _arch("aspp", ASPP, _IMG, {"cnn", "concat", "dilated", "upsample", "segmentation"}),
    _arch("cbam", CBAM, _IMG, {"cnn", "attention", "se"}),
    _arch("mlp", MLP, seq_input((2, 32)), {"mlp"}),
    _arch("mlp_bn", lambda: MLP(batchnorm=True), seq_input((2, 32)), {"mlp", "batchnorm1d"}),
    _arch("lstm_model", LSTMModel, token_input(50), {"rnn", "lstm", "embedding"}),
    _arch("gru_model", GRUModel, seq_input((2, 8, 12)), {"rnn", "gru", "bidirectional"}),
    _arch("vit", ViT, _IMG16, {"transformer", "attention", "layernorm", "vision"}),
    _arch(
        "gpt2",
        GPT2,
        token_input(64),
        {"transformer", "attention", "causal", "embedding", "tied_weights", "nlp"},
    ),
    _arch(
        "llama",
        Llama,
        token_input(64),
        {"transformer", "attention", "causal", "rmsnorm", "gqa", "rotary", "nlp"},
    ),
    _arch("mlp_mixer", MLPMixer, _IMG16, {"mlp", "token_mixing", "layernorm", "vision"}),
    _arch(
        "transformer_decoder",
        TransformerDecoder,
        seq_input((2, 8, 32), (2, 10, 32)),
        {"transformer", "attention", "cross_attention", "multi_input"},
    ),
    _arch(
        "torch_transformer_decoder",
        TorchTransformerDecoder,
        seq_input((2, 8, 32), (2, 10, 32)),
        {"transformer", "attention", "cross_attention", "multi_input", "torch_mha", "sdpa"},
        min_opset=14,
    ),
    _arch(
        "einsum_attention",
        EinsumAttention,
        seq_input((2, 8, 32)),
        {"transformer", "attention", "einsum"},
    ),
    _arch(
        "sdpa_transformer",
        SDPATransformer,
        seq_input((2, 8, 32)),
        {"transformer", "attention", "sdpa", "causal"},
        min_opset=14,
    ),
]

ARCHITECTURES: dict[str, Arch] = {a.name: a for a in _ENTRIES}
assert len(ARCHITECTURES) == len(_ENTRIES), "duplicate architecture name"
