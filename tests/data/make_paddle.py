"""Export the checked-in PaddlePaddle models of tests/data/paddle/ with paddle2onnx.

PaddlePaddle is too heavy for CI (the paddlepaddle wheel is 195 MB, about 0.9 GB installed
with paddle2onnx), and paddle2onnx pins onnx<=1.17, older than spa's. So tests/test_origins.py
runs on these files, made once in a venv of their own with:

    python3.11 -m venv venv && . venv/bin/activate
    pip install paddlepaddle==3.3.1 paddle2onnx==2.1.0 onnx==1.17.0 onnxoptimizer==0.3.13 \
        polygraphy==0.53.6 onnxruntime==1.32.0 numpy==2.4.6 protobuf==7.36.2 packaging
    python tests/data/make_paddle.py

(paddle2onnx folds constants with Polygraphy, which pip-installs onnxruntime itself when it
is missing: install it first.) Each model goes the way a Paddle user deploys one:
``paddle.jit.save`` to the PIR program (.json + .pdiparams), then ``paddle2onnx.export`` with
its default optimizations. Weights are random (seeded); BatchNorm statistics are set too.
"""

from __future__ import annotations

import pathlib
import tempfile

import numpy as np
import paddle
import paddle2onnx
from checked import check_against_framework
from paddle import nn
from paddle.nn import functional as F  # noqa: N812 - paddle's own alias

OUT = pathlib.Path(__file__).resolve().parent / "paddle"


class ResnetCNN(nn.Layer):
    """Conv+BN+ReLU, a residual block, depthwise+pointwise conv with hardswish (PP-LCNet
    style), adaptive average pooling, flatten, two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2D(3, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8)
        self.c2, self.b2 = nn.Conv2D(8, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8)
        self.c3, self.b3 = nn.Conv2D(8, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8)
        self.dw = nn.Conv2D(8, 8, 3, padding=1, groups=8)
        self.pw, self.b4 = nn.Conv2D(8, 16, 1), nn.BatchNorm2D(16)
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(x + self.b3(self.c3(F.relu(self.b2(self.c2(x))))))
        x = F.hardswish(self.b4(self.pw(self.dw(x))))
        x = paddle.flatten(self.pool(x), 1)
        return self.fc2(F.relu(self.fc1(x)))


class FlattenCNN(nn.Layer):
    """Conv+BN+ReLU, max pooling, conv, flatten of a 4x4 map into Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8)
        self.c2 = nn.Conv2D(8, 12, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(12 * 4 * 4, 24), nn.Linear(24, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = paddle.flatten(F.relu(self.c2(x)), 1)
        return self.fc2(F.relu(self.fc1(x)))


class MLP(nn.Layer):
    """Linear+BatchNorm1D+ReLU, Linear+GELU, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn = nn.Linear(20, 32), nn.BatchNorm1D(32)
        self.fc2, self.fc3 = nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.fc1(x)))
        return self.fc3(F.gelu(self.fc2(x)))


# name: (layer, input shape without the batch, opset); PP-OCR's exports use opset 11.
MODELS = {
    "paddle_resnet_cnn": (ResnetCNN, [3, 16, 16], 11),
    "paddle_flatten_cnn": (FlattenCNN, [3, 8, 8], 13),
    "paddle_mlp": (MLP, [20], 13),
}


def randomize(layer: nn.Layer, rng: np.random.Generator) -> None:
    for name, param in layer.named_parameters():
        shape = param.shape
        if name.endswith("bias"):
            value = rng.normal(0, 0.1, shape)
        elif len(shape) == 1:  # BatchNorm scale
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0, 1.0 / np.sqrt(np.prod(shape) / shape[0]), shape)
        param.set_value(value.astype("float32"))
    for sub in layer.sublayers():
        if isinstance(sub, (nn.BatchNorm1D, nn.BatchNorm2D)):
            c = sub._mean.shape[0]
            sub._mean.set_value(rng.normal(0, 0.1, c).astype("float32"))
            sub._variance.set_value(rng.uniform(0.5, 1.5, c).astype("float32"))


def main() -> None:
    paddle.seed(0)
    rng = np.random.default_rng(0)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (cls, shape, opset) in MODELS.items():
        layer = cls()
        randomize(layer, rng)
        layer.eval()
        spec = [paddle.static.InputSpec([None, *shape], "float32", "x")]
        path = OUT / f"{name}.onnx"
        with tempfile.TemporaryDirectory() as folder:
            prefix = f"{folder}/{name}"
            paddle.jit.save(layer, prefix, input_spec=spec)
            paddle2onnx.export(
                f"{prefix}.json", f"{prefix}.pdiparams", str(path), opset_version=opset
            )
        x = rng.standard_normal((2, *shape)).astype(np.float32)
        want = layer(paddle.to_tensor(x)).numpy()
        check_against_framework(path, x, want)


if __name__ == "__main__":
    main()
