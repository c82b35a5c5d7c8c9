"""Export the checked-in Keras models of tests/data/tensorflow/ with tf2onnx.

TensorFlow is too heavy for CI (the tensorflow-cpu wheel is 274 MB, about 1.4 GB installed),
so tests/test_origins.py runs on these files, made once with:

    python3.11 -m venv venv && . venv/bin/activate
    pip install tensorflow-cpu==2.21.0 keras==3.15.1 tf2onnx==1.17.0 numpy==2.4.6 \
        onnx==1.23.2 onnxruntime==1.32.0 protobuf==7.36.2
    python tests/data/make_tensorflow.py

Weights are random (seeded) but every one is set, BatchNorm statistics included, so no two
parameters are equal: tf2onnx shares equal constants, which would couple unrelated layers.
Batch is dynamic (None), as Keras models are saved. Each file is checked against Keras in
onnxruntime. Re-running gives the same graphs, up to the numbering of a folded constant's name,
which tf2onnx does not keep from run to run.
"""

from __future__ import annotations

import os
import pathlib

# Quiet TensorFlow: set before it loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import onnx
import tensorflow as tf
import tf2onnx
from checked import check_against_framework

OUT = pathlib.Path(__file__).resolve().parent / "tensorflow"
OPSET = 17
L = keras.layers


def resnet_cnn() -> keras.Model:
    """Conv2D+BN+ReLU stem, a residual block, depthwise-separable conv, max and global pooling,
    two Dense layers: tf2onnx folds the BNs into the convs and removes the NHWC Transposes."""
    image = keras.Input((16, 16, 3), name="image")
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False)(image)))
    y = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False)(x)))
    y = L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False)(y))
    x = L.ReLU()(L.Add()([x, y]))
    x = L.DepthwiseConv2D(3, padding="same")(x)
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 1)(x)))
    x = L.GlobalAveragePooling2D()(L.MaxPooling2D()(x))
    x = L.Dense(32, activation="relu")(x)
    return keras.Model(image, L.Dense(10, activation="softmax")(x), name="resnet_cnn")


def bn_after_relu() -> keras.Model:
    """BatchNormalization after the activation cannot be folded into the conv: tf2onnx writes it
    as Mul+Add. A SeparableConv2D (depthwise then pointwise) follows."""
    image = keras.Input((12, 12, 3), name="image")
    x = L.BatchNormalization()(L.Conv2D(8, 3, padding="same", activation="relu")(image))
    x = L.BatchNormalization()(L.Conv2D(12, 3, padding="same", activation="relu")(x))
    x = L.SeparableConv2D(16, 3, padding="same", activation="relu")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(image, L.Dense(4)(x), name="bn_after_relu")


def flatten_cnn() -> keras.Model:
    """Flatten of an NHWC feature map into a Dense layer (the classic small Keras CNN)."""
    image = keras.Input((12, 12, 3), name="image")
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same")(image)))
    x = L.MaxPooling2D()(x)
    x = L.Conv2D(12, 3, activation="relu")(x)
    x = L.Dense(24, activation="relu")(L.Flatten()(x))
    return keras.Model(image, L.Dense(5)(x), name="flatten_cnn")


def dense_mlp() -> keras.Model:
    """Dense+BN+ReLU+Dropout, Dense+tanh+BN, Dense: BN on 2-D data becomes Mul+Add."""
    features = keras.Input((20,), name="features")
    x = L.Dropout(0.2)(L.ReLU()(L.BatchNormalization()(L.Dense(32)(features))))
    x = L.BatchNormalization()(L.Dense(16, activation="tanh")(x))
    return keras.Model(features, L.Dense(3)(x), name="dense_mlp")


MODELS = {
    "keras_resnet_cnn": resnet_cnn,
    "keras_bn_after_relu": bn_after_relu,
    "keras_flatten_cnn": flatten_cnn,
    "keras_dense_mlp": dense_mlp,
}


def randomize(model: keras.Model, rng: np.random.Generator) -> None:
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        if isinstance(layer, L.BatchNormalization):
            c = weights[0].shape[0]
            gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c)
            mean, var = rng.normal(0, 0.1, c), rng.uniform(0.5, 1.5, c)
            layer.set_weights([a.astype(np.float32) for a in (gamma, beta, mean, var)])
            continue
        new = []
        for w in weights:
            fan_in = max(1, int(np.prod(w.shape[:-1])))
            scale = 0.1 if w.ndim == 1 else 1.0 / np.sqrt(fan_in)
            new.append(rng.normal(0, scale, w.shape).astype(np.float32))
        layer.set_weights(new)


def main() -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, build in MODELS.items():
        model = build()
        randomize(model, rng)
        shape = (None, *model.inputs[0].shape[1:])
        spec = (tf.TensorSpec(shape, tf.float32, name=model.inputs[0].name),)
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
        path = OUT / f"{name}.onnx"
        onnx.save(proto, str(path))
        x = rng.standard_normal((2, *shape[1:])).astype(np.float32)
        want = model(x, training=False).numpy()
        check_against_framework(path, x, want)


if __name__ == "__main__":
    main()
