"""Second moments H = E[x xᵀ] of the activations read by the linear consumers of prunable
groups, for OBSPA's scores and compensation.

Sources, best first when the user has them:

- ``calibration``: real inputs from an ``.npz`` file (one array per graph input, samples
  along the first axis), run through onnxruntime.
- ``synthetic`` (data-free, the default): inputs made to look like the model's domain, run
  through onnxruntime — token ids drawn from the embedding table a Gather reads them from,
  masks set to one, image-like inputs ([N, C≤4, H, W]) as smooth multi-scale random fields
  (natural images' power falls with frequency), other floats standard normal.
- ``model``: nothing runs; moments are read off the model itself (see ``model_moments``).
"""

from __future__ import annotations

import pathlib
import zipfile
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spa_compiler.analysis import Analysis
from spa_compiler.errors import BadInputError
from spa_compiler.ir import Model
from spa_compiler.linear_layers import LayerIndex, LinearLayer
from spa_compiler.model_moments import model_moments
from spa_compiler.obs import Moments
from spa_compiler.pipeline import Pass, PassResult
from spa_compiler.runtime import declared_inputs, session

SOURCES = ("synthetic", "model")
BATCH = 4  # samples per onnxruntime run (every exposed activation is held at once)
BATCHES = 8
SEQUENCE = 128  # symbolic non-batch dims (sequence length, free image sides)
ROWS_PER_RUN = 4096  # feature vectors kept per activation and run (a seeded subsample)


def consumer_layers(analysis: Analysis, graph: gs.Graph) -> list[LinearLayer]:
    index = LayerIndex(graph)
    layers, seen = [], set()
    for group in analysis.prunable:
        for member in group.consumers:
            layer = index.find(member)
            if layer is not None and layer.weight.name not in seen:
                seen.add(layer.weight.name)
                layers.append(layer)
    return layers


def _smooth_fields(rng: np.random.Generator, shape: list[int]) -> np.ndarray:
    """Image-like [N, C, H, W] values: octaves of upsampled noise with 1/f-like amplitudes,
    shared across channels (colour channels correlate) plus a little per-channel noise,
    standardized to zero mean and unit variance."""
    from scipy.ndimage import zoom

    batch, channels, height, width = shape
    field = np.zeros((batch, 1, height, width))
    scale, amplitude = max(height, width), 1.0
    while scale >= 1:
        low = (max(2, -(-height // scale) + 1), max(2, -(-width // scale) + 1))
        noise = rng.standard_normal((batch, 1, *low))
        factors = (1, 1, height / low[0], width / low[1])
        field += amplitude * zoom(noise, factors, order=1, grid_mode=True, mode="nearest")
        scale //= 2
        amplitude *= 0.6
    values = field + 0.3 * rng.standard_normal((batch, channels, height, width)) * field.std()
    return (values - values.mean()) / max(values.std(), 1e-12)


def _gather_rows(tensor: gs.Tensor) -> int | None:
    """Rows of the constant table a Gather looks ``tensor`` up in (token ids), or None."""
    for node in tensor.outputs:
        if (
            node.op == "Gather"
            and node.inputs[1] is tensor
            and isinstance(node.inputs[0], gs.Constant)
        ):
            axis = node.attrs.get("axis", 0)
            return int(node.inputs[0].shape[axis])
    return None


def synthetic_feeds(
    proto: onnx.ModelProto,
    graph: gs.Graph,
    batches: int = BATCHES,
    seed: int = 0,
    input_range: tuple[float, float] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """``input_range`` (low, high): where the model's float inputs live (pixels in [0, 1],
    say); image-like fields are spread over it through the normal CDF, other floats drawn
    uniformly. Without it they are standardized (mean 0, variance 1)."""
    from scipy.special import ndtr

    rng = np.random.default_rng([seed, 7])
    tensors = graph.tensors()
    inputs = declared_inputs(proto)
    for _ in range(batches):
        feeds = {}
        for declared in inputs:
            name, dtype = declared.name, declared.dtype
            shape = [
                (BATCH if axis == 0 else SEQUENCE) if d is None else d
                for axis, d in enumerate(declared.dims)
            ]
            tensor = tensors.get(name)
            if dtype == np.bool_:
                feeds[name] = np.ones(shape, dtype=bool)
            elif np.issubdtype(dtype, np.integer):
                rows = _gather_rows(tensor) if tensor is not None else None
                if rows:  # token ids: the whole vocabulary but the first (padding) rows
                    low = min(rows - 1, 1000 if rows > 2000 else 1)
                    feeds[name] = rng.integers(low, rows, size=shape).astype(dtype)
                else:  # attention masks and the like
                    feeds[name] = np.ones(shape, dtype=dtype)
            elif len(shape) == 4 and shape[1] <= 4:
                field = _smooth_fields(rng, shape)
                if input_range is not None:
                    low, high = input_range
                    field = low + (high - low) * ndtr(field)
                feeds[name] = field.astype(dtype)
            elif input_range is not None:
                feeds[name] = rng.uniform(*input_range, size=shape).astype(dtype)
            else:
                feeds[name] = rng.standard_normal(shape).astype(dtype)
        yield feeds


def calibration_feeds(
    path: str | pathlib.Path, proto: onnx.ModelProto, batch: int = BATCH
) -> list[dict[str, np.ndarray]]:
    """Batches of real inputs from an .npz file: one array per graph input (or a single
    array for a single-input model), samples along the first axis. Read and checked at
    once, so a bad file is refused even where no layer needs its statistics."""
    inputs = declared_inputs(proto)
    names = [declared.name for declared in inputs]
    if not pathlib.Path(path).is_file():
        raise BadInputError(f"--calib {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise BadInputError(f"--calib {path}: not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: np.asarray(archive[key]) for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise BadInputError(f"--calib {path}: not a readable .npz file ({error})") from None
    if len(names) == 1 and len(arrays) == 1 and names[0] not in arrays:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [name for name in names if name not in arrays]
    if missing:
        raise BadInputError(f"--calib {path}: no array for input(s) {', '.join(missing)}")
    samples = {int(arrays[name].shape[0]) if arrays[name].ndim else 0 for name in names}
    if len(samples) != 1 or 0 in samples:
        raise BadInputError(f"--calib {path}: inputs must share a non-empty first axis")
    for declared in inputs:
        name, dtype = declared.name, declared.dtype
        source = arrays[name]
        if source.dtype.kind not in "biuf" or (
            source.dtype.kind == "f" and np.dtype(dtype).kind != "f"
        ):
            raise BadInputError(
                f"--calib {path}: array '{name}' is {source.dtype}, the input takes {dtype}"
            )
        if source.dtype.kind == "f" and not np.isfinite(source).all():
            raise BadInputError(f"--calib {path}: array '{name}' holds inf or NaN")
        arrays[name] = source.astype(dtype)
    fixed = [declared.dims[0] for declared in inputs if declared.dims]
    fixed_batch = bool(fixed) and all(fixed)  # None (symbolic) and 0 are not fixed
    if fixed_batch:  # such a model takes that many at a time, in whole batches only
        batch = min(fixed)
    count = samples.pop()
    if fixed_batch:
        if count < batch:
            raise BadInputError(
                f"--calib {path}: the model takes batches of {batch}; give at least {batch} samples"
            )
        count -= count % batch
    return [
        {name: arrays[name][start : start + batch] for name in names}
        for start in range(0, count, batch)
    ]


def collect(
    proto: onnx.ModelProto,
    feeds: Iterator[dict[str, np.ndarray]],
    layers: list[LinearLayer],
    seed: int = 0,
    what: str = "the statistics inputs",
) -> dict[str, Moments]:
    """Run the model on ``feeds`` with every layer's input activation exposed and accumulate
    each activation's second moment over its feature axis."""
    produced = {output for node in proto.graph.node for output in node.output}
    inputs = {declared.name for declared in declared_inputs(proto)}
    wanted: dict[str, LinearLayer] = {}
    for layer in layers:
        name = layer.activation.name
        if (name in produced or name in inputs) and layer.activation.dtype is not None:
            wanted.setdefault(name, layer)
    names = sorted(name for name in wanted if name in produced)
    fed = sorted(name for name in wanted if name not in produced)  # read straight from feeds
    if not wanted:
        return {}
    extra = [
        (name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(wanted[name].activation.dtype)))
        for name in names
    ]
    try:
        runner = session(proto, extra_outputs=extra, optimize=True)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise BadInputError(f"onnxruntime cannot run the model on {what}: {first}") from None
    rng = np.random.default_rng([seed, 11])
    moments: dict[str, Moments] = {}
    for batch in feeds:
        try:
            values = runner.run(names, batch) if names else []
        except Exception as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise BadInputError(f"onnxruntime cannot run the model on {what}: {first}") from None
        for name, array in [*zip(names, values, strict=True), *((n, batch[n]) for n in fed)]:
            layer = wanted[name]
            array = np.asarray(array)
            if array.ndim == 0:
                continue
            rows = np.moveaxis(array, layer.feature_axis, -1).reshape(
                -1, array.shape[layer.feature_axis]
            )
            if rows.shape[1] != layer.features:
                continue
            if rows.shape[0] > ROWS_PER_RUN:
                rows = rows[np.sort(rng.choice(rows.shape[0], ROWS_PER_RUN, replace=False))]
            moments.setdefault(name, Moments.empty(rows.shape[1])).add(rows)
    return moments


class EstimateMoments(Pass):
    name = "estimate-moments"

    def __init__(
        self,
        analysis: Analysis,
        original: onnx.ModelProto,
        source: str = "synthetic",
        calibration: str | pathlib.Path | None = None,
        seed: int = 0,
        input_range: tuple[float, float] | None = None,
    ) -> None:
        if source not in SOURCES:
            raise BadInputError(
                f"unknown moment source {source!r} (choose from {', '.join(SOURCES)})"
            )
        self.analysis, self.original = analysis, original
        self.source, self.calibration, self.seed = source, calibration, seed
        if input_range is not None and not (
            np.isfinite(input_range).all() and float(input_range[0]) < float(input_range[1])
        ):
            raise BadInputError(f"input range must be finite LOW < HIGH, not {input_range}")
        self.input_range = input_range

    def call(self, model: Model) -> PassResult:
        layers = consumer_layers(self.analysis, model.graph)
        warnings: list[str] = []
        if self.calibration is not None:
            feeds = calibration_feeds(self.calibration, self.original)
            what = f"the --calib inputs of {self.calibration}"
            moments = collect(self.original, feeds, layers, self.seed, what)
            source = "calibration"
        elif self.source == "synthetic":
            feeds = synthetic_feeds(
                self.original, model.graph, seed=self.seed, input_range=self.input_range
            )
            source = "synthetic"
            try:
                moments = collect(self.original, feeds, layers, self.seed)
            except BadInputError as error:  # custom ops, types onnxruntime lacks (bfloat16)
                moments = model_moments(model.graph, layers, self.input_range)
                source = "model"
                warnings.append(f"{error}; second moments read off the model instead")
        else:
            moments = model_moments(model.graph, layers, self.input_range)
            source = "model"
        covered = sum(1 for layer in layers if layer.activation.name in moments)
        return PassResult(
            model,
            changed=False,
            details={
                "moments": moments,
                "source": source,
                "layers": len(layers),
                "covered": covered,
                "warnings": warnings,
            },
        )
