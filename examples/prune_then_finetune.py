"""Prune after training, then fine-tune: train a CNN, prune its ONNX export with spa, carry
the plan back into PyTorch and fine-tune the smaller model briefly.

    python examples/prune_then_finetune.py [--ratio 0.5] [--criterion obspa|l1|l2|snip|random]
        [--compensate] [--epochs 60] [--finetune-epochs 10] [--seed 0] [--quick]

torch module -> ONNX (TorchScript exporter, no constant folding) ->
spa_compiler.compile(...) -> plan.json -> apply_plan -> fine-tune in torch. By default the
compile does not refit the kept weights and fine-tuning does the repair; with
``--compensate`` (OBSPA's least-squares refit) ``apply_plan(..., pruned=)`` carries the refit
values into the module too, so fine-tuning starts from the compensated model. Data:
scikit-learn's bundled digits, the split of models/make_digits_cnn.py. Seeded and
single-threaded. ``--quick`` trains and fine-tunes one epoch each (what the tests run).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import torch
from prune_before_training import export, matches_onnx

import spa_compiler
from spa_compiler.frameworks.torch import apply_plan

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
from make_digits_cnn import DigitsCNN, accuracy, data, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5, help="channels removed per group")
    parser.add_argument(
        "--criterion", default="obspa", choices=["obspa", "l1", "l2", "snip", "random"]
    )
    parser.add_argument(
        "--compensate", action="store_true", help="refit the kept weights and carry the refit"
    )
    parser.add_argument("--epochs", type=int, default=60, help="dense training")
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="one epoch each (for tests)")
    args = parser.parse_args()
    epochs, finetune_epochs = (1, 1) if args.quick else (args.epochs, args.finetune_epochs)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # deterministic training
    x_train, x_test, y_train, y_test = data()

    net = train(DigitsCNN(), x_train, y_train, epochs, seed=args.seed)
    dense_accuracy = accuracy(net, x_test, y_test)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="spa-example-"))
    export(net, folder / "trained.onnx")
    pruned, report = spa_compiler.compile(
        folder / "trained.onnx",
        ratio=args.ratio,
        criterion=args.criterion,
        compensate=args.compensate,
        input_range=(0.0, 1.0),  # pixels / 16
        seed=args.seed,
    )
    report.plan.save(folder / "plan.json")
    apply_plan(net, folder / "plan.json", model=folder / "trained.onnx",
               pruned=pruned if args.compensate else None)  # fmt: skip
    difference = matches_onnx(net, pruned.SerializeToString(), x_test)
    assert difference < 1e-4, f"the sliced module differs from the pruned ONNX by {difference}"
    pruned_accuracy = accuracy(net, x_test, y_test)

    # Fine-tune at a tenth of the training rate: the kept weights are a good start.
    train(net, x_train, y_train, finetune_epochs, lr=3e-4, seed=args.seed + 1)
    result = {
        "criterion": args.criterion,
        "ratio": args.ratio,
        "epochs": epochs,
        "finetune_epochs": finetune_epochs,
        "seed": args.seed,
        "params_kept": report.after["parameters"] / report.before["parameters"],
        "macs_kept": report.after["macs"] / report.before["macs"],
        "dense_trained": dense_accuracy,
        "pruned": pruned_accuracy,
        "pruned_then_finetuned": accuracy(net, x_test, y_test),
        "plan": str(folder / "plan.json"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
