"""Time loading, preparing and analysing ResNet-50- and BERT-base-sized graphs.

    python benchmarks/bench_analysis.py [--out /tmp/spa-bench] [--repeat 5]

Models are defined here with ResNet-50's and BERT-base's real layer structure and sizes,
random weights, exported once with torch's legacy exporter (opset 17) and cached in --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time
import warnings

import torch
from torch import nn

import spa_compiler
from spa_compiler.ir import load_model


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * 4
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        layers, c_in = [], 64
        for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
            for i in range(blocks):
                layers.append(Bottleneck(c_in, width, stride if i == 0 else 1))
                c_in = width * 4
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(
            torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)
        )


class BertLayer(nn.Module):
    def __init__(self, hidden: int = 768, heads: int = 12, ffn: int = 3072) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.o, self.ln1 = nn.Linear(hidden, hidden), nn.LayerNorm(hidden)
        self.f1, self.f2, self.ln2 = (
            nn.Linear(hidden, ffn),
            nn.Linear(ffn, hidden),
            nn.LayerNorm(hidden),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5 + mask
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
        x = self.ln1(x + self.o(context))
        return self.ln2(x + self.f2(nn.functional.gelu(self.f1(x))))


class BertBase(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(30522, 768), nn.Embedding(512, 768)
        self.ln = nn.LayerNorm(768)
        self.layers = nn.ModuleList(BertLayer() for _ in range(12))
        self.pool = nn.Linear(768, 768)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        x = self.ln(self.tokens(ids) + self.positions(positions))
        additive = (1.0 - mask[:, None, None, :].float()) * -10000.0
        for layer in self.layers:
            x = layer(x, additive)
        return torch.tanh(self.pool(x[:, 0]))


def export(name: str, out: pathlib.Path) -> pathlib.Path:
    path = out / f"{name}.onnx"
    if path.exists():
        return path
    torch.manual_seed(0)
    if name == "resnet50":
        model, args = ResNet50().eval(), (torch.randn(1, 3, 224, 224),)
        names, axes = ["input"], {"input": {0: "batch"}}
    else:
        model = BertBase().eval()
        args = (torch.randint(0, 30522, (1, 128)), torch.ones(1, 128, dtype=torch.int64))
        names, axes = ["ids", "mask"], {"ids": {0: "batch"}, "mask": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=names,
            dynamic_axes=axes,
        )
    return path


def time_model(path: pathlib.Path, repeat: int) -> dict:
    load, prepare, analyze = [], [], []
    for _ in range(repeat):
        started = time.perf_counter()
        raw = load_model(path)
        loaded = time.perf_counter()
        model = spa_compiler.prepare(raw)
        prepared = time.perf_counter()
        analysis = spa_compiler.inspect(model)
        analyzed = time.perf_counter()
        load.append(loaded - started)
        prepare.append(prepared - loaded)
        analyze.append(analyzed - prepared)
    summary = analysis.summary()
    return {
        "nodes": len(model.graph.nodes),
        "weight_parameters": summary["weight_parameters"],
        "groups": summary["groups"],
        "prunable_groups": summary["prunable_groups"],
        "coverage": summary["coverage"],
        "load_s": statistics.median(load),
        "prepare_s": statistics.median(prepare),
        "analyze_s": statistics.median(analyze),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/spa-bench"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--models", default="resnet50,bert-base")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    results = {}
    for name in args.models.split(","):
        results[name] = time_model(export(name, args.out), args.repeat)
        row = results[name]
        print(
            f"{name:10s} nodes {row['nodes']:5d}  params {row['weight_parameters']:>11,}  "
            f"groups {row['groups']:4d} (prunable {row['prunable_groups']:3d}, coverage "
            f"{100 * row['coverage']:.1f}%)  load {row['load_s']:.3f} s  prepare "
            f"{row['prepare_s']:.3f} s  analyze {row['analyze_s']:.3f} s"
        )
    print(
        json.dumps(
            {
                "machine": platform.platform(),
                "python": platform.python_version(),
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
