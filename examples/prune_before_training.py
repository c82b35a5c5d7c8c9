"""Prune before training: prune a randomly initialised CNN with a criterion that needs no
trained weights, carry the plan back into PyTorch, and train only the smaller model.

    python examples/prune_before_training.py [--ratio 0.5] [--criterion snip|random]
        [--epochs 60] [--seed 0] [--quick]

torch module -> ONNX (TorchScript exporter, no constant folding: the weights keep their
state_dict names) -> spa_compiler.compile(..., compensate=False) -> plan.json -> apply_plan
-> train in torch. The dense model is trained from the same initialisation with the same
recipe, for comparison. Data: scikit-learn's bundled digits, the split of
models/make_digits_cnn.py. Seeded and single-threaded: the same command gives the same
numbers. ``--quick`` trains one epoch (what the tests run).
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys
import tempfile
import warnings

import numpy as np
import onnxruntime as ort
import torch

import spa_compiler
from spa_compiler.frameworks.torch import apply_plan

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
from make_digits_cnn import DigitsCNN, accuracy, data, train


def export(net: torch.nn.Module, path: pathlib.Path) -> None:
    """The export apply_plan can map back: TorchScript exporter, weights left unfolded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(),
            (torch.zeros(1, 1, 8, 8),),
            str(path),
            dynamo=False,
            do_constant_folding=False,
            opset_version=17,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )


def matches_onnx(net: torch.nn.Module, pruned_onnx: bytes, images: np.ndarray) -> float:
    """Largest difference between the sliced module and the pruned ONNX model's logits."""
    session = ort.InferenceSession(pruned_onnx, providers=["CPUExecutionProvider"])
    expected = session.run(None, {"image": images})[0]
    with torch.no_grad():
        actual = net.eval()(torch.from_numpy(images)).numpy()
    return float(np.abs(actual - expected).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5, help="channels removed per group")
    parser.add_argument("--criterion", default="snip", choices=["snip", "random"])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="one epoch (for tests)")
    args = parser.parse_args()
    epochs = 1 if args.quick else args.epochs
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # deterministic training
    x_train, x_test, y_train, y_test = data()

    net = DigitsCNN()  # untrained
    dense = copy.deepcopy(net)  # the same initialisation, kept whole
    folder = pathlib.Path(tempfile.mkdtemp(prefix="spa-example-"))
    export(net, folder / "untrained.onnx")
    # Pixels live in [0, 1]: the synthetic inputs snip scores on are drawn there.
    pruned, report = spa_compiler.compile(
        folder / "untrained.onnx",
        ratio=args.ratio,
        criterion=args.criterion,
        compensate=False,  # a refit is not carried into torch (and means nothing untrained)
        input_range=(0.0, 1.0),
        seed=args.seed,
    )
    report.plan.save(folder / "plan.json")
    apply_plan(net, folder / "plan.json", model=folder / "untrained.onnx")
    difference = matches_onnx(net, pruned.SerializeToString(), x_test)
    assert difference < 1e-4, f"the sliced module differs from the pruned ONNX by {difference}"

    train(net, x_train, y_train, epochs, seed=args.seed)
    train(dense, x_train, y_train, epochs, seed=args.seed)
    result = {
        "criterion": args.criterion,
        "ratio": args.ratio,
        "epochs": epochs,
        "seed": args.seed,
        "params_kept": report.after["parameters"] / report.before["parameters"],
        "macs_kept": report.after["macs"] / report.before["macs"],
        "dense_trained": accuracy(dense, x_test, y_test),
        "pruned_then_trained": accuracy(net, x_test, y_test),
        "plan": str(folder / "plan.json"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
