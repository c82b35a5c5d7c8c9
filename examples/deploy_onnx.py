"""Deploy any ONNX file: prune it with spa (OBSPA, refit included: the result stays in ONNX),
time it against the original in onnxruntime, and save it.

    python examples/deploy_onnx.py [MODEL.onnx] [-o OUT.onnx] [--ratio 0.3 | --target-flops F]
        [--criterion obspa] [--input-range LOW,HIGH] [--batches 1,8] [--runs 30] [--quick]

MODEL defaults to the shipped digits CNN (models/digits_cnn.onnx, pixels in [0, 1]); OUT to
MODEL's name with .pruned.onnx, in the current folder. ``--quick`` times 3 runs at batch 1
(what the tests run). The CLI does the same in one line:
``spa compile MODEL --ratio 0.3 -o OUT --bench``.
"""

from __future__ import annotations

import argparse
import pathlib

import spa_compiler
from spa_compiler.io import PROTOBUF_LIMIT, write_model

DIGITS = pathlib.Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=pathlib.Path, nargs="?", default=DIGITS)
    parser.add_argument("-o", "--output", type=pathlib.Path)
    parser.add_argument("--ratio", type=float, default=0.3, help="channels removed per group")
    parser.add_argument("--target-flops", type=float, help="fraction of the MACs to keep")
    parser.add_argument("--criterion", default="obspa")
    parser.add_argument("--input-range", help="LOW,HIGH of the float inputs (default: 0,1 for "
                        "the digits CNN, standardized otherwise)")  # fmt: skip
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="3 runs at batch 1 (for tests)")
    args = parser.parse_args()
    output = args.output or pathlib.Path(f"{args.model.stem}.pruned.onnx")
    input_range = (
        tuple(float(v) for v in args.input_range.split(","))
        if args.input_range
        else ((0.0, 1.0) if args.model.resolve() == DIGITS else None)
    )

    pruned, report = spa_compiler.compile(
        args.model,
        ratio=args.ratio,
        target_flops=args.target_flops,
        criterion=args.criterion,
        input_range=input_range,
    )
    print(report.summary())
    # Weights go to OUT.data only where protobuf could not hold them.
    write_model(output, pruned, external=pruned.ByteSize() >= PROTOBUF_LIMIT)
    print(f"wrote {output}")

    batches = (1,) if args.quick else tuple(int(b) for b in args.batches.split(","))
    timed = spa_compiler.bench(
        [args.model, output], batches=batches, runs=3 if args.quick else args.runs
    )
    print(timed.table())


if __name__ == "__main__":
    main()
