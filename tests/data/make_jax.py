"""Export the checked-in JAX / Flax models of tests/data/jax/ with jax2onnx.

jax2onnx pulls in jaxlib (85 MB), tensorstore (22 MB), orbax, optax, equinox, netron and more:
too heavy for CI, so tests/test_origins.py runs on these files, made once with:

    python3.11 -m venv venv && . venv/bin/activate
    pip install jax2onnx==0.17.1 jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 numpy==2.4.6 \
        onnx==1.23.2 onnx-ir==1.1.0 onnxruntime==1.32.0 ml_dtypes==0.6.0 protobuf==7.36.2
    python tests/data/make_jax.py

Each model is exported with jax2onnx's defaults (a symbolic batch "B"), but at opset 21, the
newest spa read when they were made (jax2onnx's default is 23: flax_mlp_opset23.onnx is that;
spa reads it since it supports opset 23), and checked against JAX in onnxruntime. Weights are
Flax's seeded initializers, plus random BatchNorm statistics and biases (Flax starts them at
zero, and equal constants could be shared).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from checked import check_against_framework
from flax import nnx
from jax2onnx import to_onnx

OUT = pathlib.Path(__file__).resolve().parent / "jax"
# jax2onnx's default is opset 23; spa read opsets 11-21 when these were made (flax_mlp_opset23
# is the default's file)
OPSET = 21


class MLP(nnx.Module):
    """Flax NNX Linear+ReLU, Linear+GELU, Linear."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l1 = nnx.Linear(20, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 16, rngs=rngs)
        self.l3 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.l3(nnx.gelu(self.l2(nnx.relu(self.l1(x)))))


class ResnetCNN(nnx.Module):
    """Flax NNX Conv+BatchNorm+ReLU, a residual block, a strided conv, average pooling, a mean
    over space and a Linear head (NHWC, as Flax computes)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.c1 = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.b1 = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
        self.c2 = nnx.Conv(8, 8, (3, 3), use_bias=False, rngs=rngs)
        self.b2 = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
        self.c3 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
        self.fc = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.b1(self.c1(x)))
        x = nnx.relu(x + self.b2(self.c2(x)))
        x = nnx.relu(self.c3(x))
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        return self.fc(x.mean(axis=(1, 2)))


class FlattenCNN(nnx.Module):
    """Flax NNX Conv+ReLU, max pooling, Conv+ReLU, reshape (B, H, W, C) -> (B, H*W*C), Linear."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.c1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.c2 = nnx.Conv(8, 12, (3, 3), rngs=rngs)
        self.l1 = nnx.Linear(4 * 4 * 12, 24, rngs=rngs)
        self.l2 = nnx.Linear(24, 5, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.c1(x)), window_shape=(2, 2), strides=(2, 2))
        x = nnx.relu(self.c2(x))
        x = x.reshape(x.shape[0], -1)
        return self.l2(nnx.relu(self.l1(x)))


def function_mlp(rng: np.random.Generator):
    """Plain JAX, no Flax: the weights are constants the function closes over."""
    sizes = [(20, 32), (32, 16), (16, 3)]
    params = [
        (rng.normal(0, 1 / np.sqrt(i), (i, o)).astype(np.float32),
         rng.normal(0, 0.1, o).astype(np.float32))
        for i, o in sizes
    ]  # fmt: skip

    def forward(x):
        (w1, b1), (w2, b2), (w3, b3) = params
        h = jax.nn.relu(x @ w1 + b1)
        h = jnp.tanh(h @ w2 + b2)
        return h @ w3 + b3

    return forward


def randomize(module: nnx.Module, rng: np.random.Generator) -> None:
    """Random biases, BatchNorm scales and statistics (Flax initializes them to 0 and 1)."""
    for _, sub in nnx.iter_modules(module):
        if isinstance(sub, nnx.BatchNorm):
            c = sub.scale.shape[0]
            sub.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
            sub.bias[...] = jnp.asarray(rng.normal(0, 0.1, c), jnp.float32)
            sub.mean[...] = jnp.asarray(rng.normal(0, 0.1, c), jnp.float32)
            sub.var[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
        elif isinstance(sub, (nnx.Linear, nnx.Conv)) and sub.bias is not None:
            c = sub.bias.shape[0]
            sub.bias[...] = jnp.asarray(rng.normal(0, 0.1, c), jnp.float32)


def main() -> None:
    rng = np.random.default_rng(0)
    OUT.mkdir(parents=True, exist_ok=True)
    mlp = MLP(nnx.Rngs(0))
    models = {
        "flax_mlp": (mlp, (20,), OPSET),
        "flax_resnet_cnn": (ResnetCNN(nnx.Rngs(1)), (16, 16, 3), OPSET),
        "flax_flatten_cnn": (FlattenCNN(nnx.Rngs(2)), (8, 8, 3), OPSET),
        "jax_function_mlp": (function_mlp(rng), (20,), OPSET),
        # jax2onnx's default opset (spa reads it since opsets 22-23 were added)
        "flax_mlp_opset23": (mlp, (20,), 23),
    }
    for name, (model, shape, opset) in models.items():
        if isinstance(model, nnx.Module) and name != "flax_mlp_opset23":
            randomize(model, rng)
        proto = to_onnx(model, [("B", *shape)], model_name=name, opset=opset)
        path = OUT / f"{name}.onnx"
        onnx.save(proto, str(path))
        x = rng.standard_normal((2, *shape)).astype(np.float32)
        want = np.asarray(model(jnp.asarray(x)))
        check_against_framework(path, x, want)


if __name__ == "__main__":
    main()
