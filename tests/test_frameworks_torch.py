"""apply_plan: a spa plan carried back into the torch module, checked against the pruned ONNX
model in onnxruntime, for models exported by torch's real exporters."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import warnings

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402, N812 - the universal alias
from oracle import run  # noqa: E402
from torch import nn  # noqa: E402

import spa_compiler  # noqa: E402
from spa_compiler.frameworks.torch import PrunedMultiheadAttention, apply_plan  # noqa: E402
from spa_compiler.plan import Plan  # noqa: E402

# The export settings apply_plan supports (see spa_compiler/frameworks/torch.py).
EXPORTS = {
    # TorchScript exporter, constants not folded: state_dict names, BatchNorm kept
    "torchscript": {"dynamo": False, "opset_version": 17, "do_constant_folding": False},
    # dynamo exporter with its optimizer: BatchNorm fused into the layer before it
    "dynamo": {"dynamo": True, "opset_version": 18},
    # dynamo exporter without the optimizer: names and BatchNorm kept, transposes unfolded
    "dynamo-raw": {"dynamo": True, "opset_version": 18, "optimize": False},
}


# --------------------------------------------------------------------------- models


class ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 24, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)) + y)
        y = F.relu(self.bn3(self.conv3(y)))
        return self.fc(y.mean((2, 3)))


class GroupedCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.pointwise = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.ReLU())
        self.head = nn.Conv2d(32, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(self.pointwise(self.depthwise(self.stem(x))))
        return self.head(x).mean((2, 3))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 96), nn.BatchNorm1d(96), nn.GELU(),
            nn.Linear(96, 7),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class HFSelfAttention(nn.Module):
    """Hugging Face-style attention: separate projections, head counts on the module."""

    def __init__(self, hidden: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.head_dim = hidden // heads
        self.all_head_size = hidden
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape

        def heads(projected: torch.Tensor) -> torch.Tensor:
            return projected.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        out = (torch.softmax(scores, -1) @ v).transpose(1, 2)
        return self.o_proj(out.reshape(batch, length, self.all_head_size))


class HFBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = HFSelfAttention()
        self.norm = nn.LayerNorm(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.attn(x))


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 96)
        self.fc1 = nn.Linear(96, 64)
        self.fc2 = nn.Linear(64, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.embed(ids)))).mean(1)


class Upsampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.up = nn.ConvTranspose2d(16, 12, 2, stride=2)
        self.bn_up = nn.BatchNorm2d(12)
        self.out = nn.Conv2d(12, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.bn_up(self.up(F.relu(self.bn(self.conv(x)))))))


class Untraceable(ResidualCNN):
    """torch.fx cannot follow ``if`` on a tensor property; the exporters can."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError("NCHW input expected")
        return super().forward(x)


def image(batch: int = 2, channels: int = 3, size: int = 8) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(2)),)


MODELS = {
    "cnn": (ResidualCNN, image),
    "grouped": (GroupedCNN, image),
    "mlp": (MLP, lambda: (torch.randn(4, 20, generator=torch.Generator().manual_seed(2)),)),
    "transformer": (
        TransformerBlock,
        lambda: (torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2)),),
    ),
    "hf-attention": (
        HFBlock,
        lambda: (torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2)),),
    ),
    "embedding": (
        EmbeddingNet,
        lambda: (torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(2)),),
    ),
    "conv-transpose": (Upsampler, lambda: image(size=6)),
    "untraceable": (Untraceable, image),
}


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model in eval mode, norms given non-trivial statistics (default ones would make the
    exporters share or drop identical tensors)."""
    factory, inputs = MODELS[name]
    torch.manual_seed(0)
    module = factory()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                norm.weight.uniform_(0.5, 1.5, generator=generator)
                norm.bias.uniform_(-0.2, 0.2, generator=generator)
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                norm.running_mean.uniform_(-0.2, 0.2, generator=generator)
                norm.running_var.uniform_(0.5, 1.5, generator=generator)
    return module.eval(), inputs()


def export(module: nn.Module, inputs: tuple, path: pathlib.Path, setting: str) -> pathlib.Path:
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull:
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
            torch.onnx.export(module, inputs, str(path), **EXPORTS[setting])
    return path


def prune(path: pathlib.Path, **options) -> tuple[onnx.ModelProto, Plan]:
    """Prune without compensation: the plan then says everything the compile changed."""
    options = {"ratio": 0.5, "criterion": "l1", "compensate": False, "round_to": 1, **options}
    pruned, report = spa_compiler.compile(path, **options)
    assert report.groups_pruned > 0
    return pruned, report.plan


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def assert_same_outputs(module: nn.Module, inputs: tuple, pruned: onnx.ModelProto) -> None:
    names = [value.name for value in pruned.graph.input]
    expected = run(pruned, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})[0]
    with torch.no_grad():
        got = module(*inputs)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- round trips

CASES = [
    ("cnn", "torchscript", False),
    ("cnn", "dynamo", False),  # BatchNorm fused: conv1.weight_bias, bn* sliced from fx
    ("grouped", "torchscript", False),
    ("grouped", "dynamo", False),
    ("mlp", "dynamo", False),  # BatchNorm1d fused into the Gemm
    ("transformer", "torchscript", True),  # small weights folded through Transpose by spa
    ("hf-attention", "torchscript", True),
    ("hf-attention", "dynamo-raw", True),
    ("embedding", "torchscript", True),
    ("conv-transpose", "torchscript", False),
    ("conv-transpose", "dynamo", False),
]


@pytest.mark.parametrize(
    ("name", "setting", "with_model"), CASES, ids=[f"{n}-{s}" for n, s, _ in CASES]
)
def test_sliced_module_equals_pruned_onnx(tmp_path, name, setting, with_model):
    module, inputs = build(name)
    path = export(module, inputs, tmp_path / "model.onnx", setting)
    pruned, plan = prune(path)
    plan.save(tmp_path / "plan.json")
    before = parameters(module)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    returned = apply_plan(module, tmp_path / "plan.json", model=path if with_model else None)
    assert returned is module
    assert parameters(module) < before
    assert {n for n, p in module.named_parameters() if p.requires_grad} == trainable
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert_same_outputs(module, inputs, pruned)
    repr(module)


def test_module_attributes_follow_the_new_shapes(tmp_path):
    module, inputs = build("grouped")
    _, plan = prune(export(module, inputs, tmp_path / "m.onnx", "torchscript"))
    apply_plan(module, plan)
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            assert layer.out_channels == layer.weight.shape[0]
            assert layer.in_channels == layer.weight.shape[1] * layer.groups
        if isinstance(layer, nn.BatchNorm2d):
            assert layer.num_features == layer.running_mean.shape[0] == layer.weight.shape[0]
    depthwise = module.depthwise[0]
    assert depthwise.groups == depthwise.out_channels < 16  # still depthwise, fewer channels
    assert module.grouped[0].groups < 4  # whole conv groups went


def test_heads_follow_in_hugging_face_style_attention(tmp_path):
    module, inputs = build("hf-attention")
    path = export(module, inputs, tmp_path / "m.onnx", "torchscript")
    _, plan = prune(path)
    apply_plan(module, plan, model=path)
    attention = module.attn
    assert attention.num_heads == 2 and attention.head_dim == 16
    assert attention.all_head_size == 32 == attention.q_proj.out_features
    assert attention.o_proj.in_features == 32


def test_a_refused_plan_leaves_the_module_unchanged(tmp_path):
    """heads="dim" in Hugging Face-style attention is refused only once the projections are
    sliced (their forward would rescale): everything sliced so far must be put back."""
    module, inputs = build("hf-attention")
    path = export(module, inputs, tmp_path / "m.onnx", "torchscript")
    _, plan = prune(path, heads="dim")
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(spa_compiler.BadInputError, match="within the heads"):
        apply_plan(module, plan, model=path)
    assert module.attn.q_proj.out_features == 64 and module.attn.num_heads == 4
    after = module.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_multihead_attention_head_dims(tmp_path):
    """TorchScript's MultiheadAttention folds heads into the batch axis, so spa prunes dims
    within every head: the module keeps 4 heads of 4 dims and the graph's scale, 1/sqrt(8)."""
    module, inputs = build("transformer")
    path = export(module, inputs, tmp_path / "m.onnx", "torchscript")
    pruned, plan = prune(path)
    apply_plan(module, plan, model=path)
    attention = module.attn
    assert isinstance(attention, PrunedMultiheadAttention)
    assert (attention.num_heads, attention.head_dim, attention.v_head_dim) == (4, 4, 4)
    assert attention.embed_dim == 32 and attention.out_proj.in_features == 16
    assert attention.scale == pytest.approx(1 / math.sqrt(8))
    assert_same_outputs(module, inputs, pruned)


def test_multihead_attention_whole_heads():
    """A plan that removes head 1 of 4 (q, k, v rows and the out_proj columns): the sliced
    module must equal the original with that head's out_proj columns zeroed."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.MultiheadAttention(16, 4, batch_first=True)).eval()
    attention = module[0]
    head = np.arange(4, 8)
    rows = np.concatenate([head, head + 16, head + 32])
    plan = {
        "version": 1,
        "groups": [
            {
                "group": 0,
                "channels": 4,
                "keep": [0, 2, 3],
                "members": [
                    {"tensor": "0.in_proj_weight", "axis": 0, "kind": "weight"},
                    {"tensor": "0.in_proj_bias", "axis": 0, "kind": "weight"},
                    {"tensor": "0.out_proj.weight", "axis": 1, "kind": "weight"},
                ],
            }
        ],
    }
    for member in plan["groups"][0]["members"]:
        per_head = rows if member["tensor"].startswith("0.in_proj") else head
        member["indices"] = [(per_head - 4 + 4 * h).tolist() for h in range(4)]
    x = torch.randn(2, 5, 16)
    reference = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    reference.load_state_dict(attention.state_dict())
    with torch.no_grad():
        reference.out_proj.weight[:, head] = 0
        want = reference(x, x, x)[0]
    apply_plan(module, plan)
    assert (attention.num_heads, attention.head_dim, attention.embed_dim) == (3, 4, 16)
    assert attention.in_proj_weight.shape == (36, 16)
    with torch.no_grad():
        torch.testing.assert_close(attention(x, x, x)[0], want, rtol=1e-5, atol=1e-5)


def test_pruned_multihead_attention_computes_what_torch_does():
    """The replacement forward, on an unpruned module, against torch's own: masks, weights,
    batch-first and sequence-first, unbatched."""
    torch.manual_seed(0)
    for batch_first in (True, False):
        reference = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        pruned = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        pruned.load_state_dict(reference.state_dict())
        pruned.__class__ = PrunedMultiheadAttention
        pruned.scale, pruned.v_head_dim = 0.5, 4
        shape = (2, 5, 16) if batch_first else (5, 2, 16)
        q, kv = torch.randn(*shape), torch.randn(*shape)
        padding = torch.tensor([[False] * 4 + [True], [False] * 5])
        float_padding = torch.zeros(2, 5).masked_fill(padding, float("-inf"))
        causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
        for options in (
            {},
            {"key_padding_mask": padding, "average_attn_weights": False},
            {"attn_mask": causal},
            {"attn_mask": torch.randn(5, 5), "key_padding_mask": float_padding},
            {"attn_mask": causal, "is_causal": True, "need_weights": False},
        ):
            with torch.no_grad():
                want = reference(q, kv, kv, **options)
                got = pruned(q, kv, kv, **options)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
            if want[1] is not None:
                torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        single = q[0] if batch_first else q[:, 0]
        with torch.no_grad():
            torch.testing.assert_close(
                pruned(single, single, single)[0], reference(single, single, single)[0]
            )


def test_parameters_stay_on_their_device_and_dtype(tmp_path):
    module, inputs = build("cnn")
    pruned, plan = prune(export(module, inputs, tmp_path / "m.onnx", "torchscript"))
    module.double()
    module.fc.weight.requires_grad_(False)
    apply_plan(module, plan)
    assert all(p.dtype == torch.float64 for p in module.parameters())
    assert all(b.dtype == torch.float64 for b in module.buffers() if b.is_floating_point())
    assert not module.fc.weight.requires_grad and module.conv1.weight.requires_grad
    assert isinstance(module.fc.weight, nn.Parameter)
    assert isinstance(module.bn1.running_mean, torch.Tensor)
    assert "running_mean" in module.bn1._buffers
    module.float()
    assert_same_outputs(module, inputs, pruned)


# --------------------------------------------------------------------------- refusals


def test_plan_for_another_model_is_refused(tmp_path):
    module, inputs = build("cnn")
    _, plan = prune(export(module, inputs, tmp_path / "m.onnx", "torchscript"))
    other, _ = build("grouped")
    with pytest.raises(spa_compiler.BadInputError, match=r"'conv\d\.weight'.*not a parameter"):
        apply_plan(other, plan)
    small = ResidualCNN()  # same names, fewer channels than the plan removes
    small.conv3 = nn.Conv2d(16, 4, 3, padding=1)
    small.bn3, small.fc = nn.BatchNorm2d(4), nn.Linear(4, 10)
    with pytest.raises(spa_compiler.BadInputError, match="removes index"):
        apply_plan(small, plan)


def test_folded_exports_are_refused_naming_the_tensor(tmp_path):
    # TorchScript with constant folding (its default) folds BatchNorm and renames the weights
    module, inputs = build("cnn")
    folded = tmp_path / "folded.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, str(folded), dynamo=False, opset_version=17)
    _, plan = prune(folded)
    with pytest.raises(spa_compiler.BadInputError, match=r"'onnx::Conv_\d+'"):
        apply_plan(module, plan, model=folded)
    # the dynamo optimizer folds transposed weights into anonymous constants
    module, inputs = build("embedding")
    path = export(module, inputs, tmp_path / "dynamo.onnx", "dynamo")
    _, plan = prune(path)
    with pytest.raises(spa_compiler.BadInputError, match=r"'val_\d+'"):
        apply_plan(module, plan, model=path)
    # without the model, spa's own folded Transposes cannot be traced back
    module, inputs = build("embedding")
    path = export(module, inputs, tmp_path / "raw.onnx", "torchscript")
    _, plan = prune(path)
    with pytest.raises(spa_compiler.BadInputError, match=r"Transpose_output_0.*model="):
        apply_plan(module, plan)


def test_a_transpose_without_perm_is_traced_as_reversed_axes(tmp_path):
    """ONNX's Transpose without ``perm`` reverses the axes; a plan naming spa's folded copy
    of such a transposed weight slices the module's weight along the matching axis."""
    module, inputs = build("embedding")
    path = export(module, inputs, tmp_path / "raw.onnx", "torchscript")
    model = onnx.load(path)
    bare = 0
    for node in model.graph.node:
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if node.op_type == "Transpose" and perm == [list(reversed(range(len(perm[0]))))]:
            node.ClearField("attribute")
            bare += 1
    assert bare
    onnx.save(model, tmp_path / "bare.onnx")
    pruned, plan = prune(tmp_path / "bare.onnx")
    assert any("Transpose" in m["tensor"] for g in plan.groups for m in g.members)
    apply_plan(module, plan, model=tmp_path / "bare.onnx")
    assert_same_outputs(module, inputs, pruned)


def test_fused_batchnorm_in_an_untraceable_module_is_refused(tmp_path):
    module, inputs = build("untraceable")
    path = export(module, inputs, tmp_path / "fused.onnx", "dynamo")
    _, plan = prune(path)
    with pytest.raises(spa_compiler.BadInputError, match=r"weight_bias.*torch\.fx"):
        apply_plan(module, plan, model=path)
    # exported with BatchNorm kept, the plan names every tensor: no trace needed
    module, inputs = build("untraceable")
    path = export(module, inputs, tmp_path / "kept.onnx", "torchscript")
    pruned, plan = prune(path)
    apply_plan(module, plan, model=path)
    assert_same_outputs(module, inputs, pruned)


def test_plan_without_member_kinds(tmp_path):
    module, inputs = build("cnn")
    path = export(module, inputs, tmp_path / "m.onnx", "torchscript")
    pruned, plan = prune(path)
    data = plan.to_json()
    for group in data["groups"]:
        for member in group["members"]:
            del member["kind"]  # as spa saved plans before kinds were recorded
    with pytest.raises(spa_compiler.BadInputError, match="which members are weights"):
        apply_plan(module, json.loads(json.dumps(data)))
    old = Plan.from_json(data)
    _, report = spa_compiler.compile(path, plan=old, compensate=False)  # matching adds kinds
    apply_plan(module, report.plan.to_json())
    assert_same_outputs(module, inputs, pruned)


def test_dynamo_placeholder_names_map_when_unambiguous(tmp_path):
    """Older dynamo exports named initializers after the ExportedProgram's placeholders."""
    module, inputs = build("cnn")
    pruned, plan = prune(export(module, inputs, tmp_path / "m.onnx", "torchscript"))
    data = plan.to_json()
    for group in data["groups"]:
        for member in group["members"]:
            if member["kind"] == "weight":
                prefix = "b_" if "running" in member["tensor"] else "p_"
                member["tensor"] = prefix + member["tensor"].replace(".", "_")
    apply_plan(module, data)
    assert_same_outputs(module, inputs, pruned)


class _Chunked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.fc2 = nn.Linear(16, 96), nn.Linear(96, 5)
        with torch.no_grad():
            self.fc.weight[:48] *= 5  # the first half larger: global ranking keeps more of it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.fc(x).chunk(2, -1)
        return self.fc2(torch.cat([second, first], -1))


def test_parts_of_a_chunk_pruned_unevenly_are_warned_about(tmp_path):
    """apply_plan cannot see forward: chunk(2) splits the sliced output evenly, the plan cut
    the two halves (separate groups) by different counts; it says so instead of staying
    silent."""
    torch.manual_seed(0)
    torch.randn(2, 3, 8, 8)  # weights for which global ranking cuts the halves 17 and 21
    module = _Chunked().eval()
    inputs = (torch.randn(3, 16),)
    path = export(module, inputs, tmp_path / "model.onnx", "torchscript")
    _, report = spa_compiler.compile(
        str(path), ratio=0.4, criterion="l1", compensate=False, round_to=1, global_ranking=True
    )
    with pytest.warns(spa_compiler.errors.SpaWarning, match="chunk"):
        apply_plan(module, report.plan, model=path)


REFIT_CASES = [
    ("cnn", "torchscript"),
    ("mlp", "torchscript"),
    ("transformer", "torchscript"),  # refit lands in spa's folded Transpose of fc2.weight
    ("hf-attention", "torchscript"),
    ("embedding", "torchscript"),
    ("cnn", "dynamo-raw"),
    ("conv-transpose", "dynamo"),
]


@pytest.mark.parametrize(("name", "setting"), REFIT_CASES, ids=[f"{n}-{s}" for n, s in REFIT_CASES])
def test_obspa_refit_is_carried_with_the_pruned_model(tmp_path, name, setting):
    """OBSPA compensation refits the weights that read the removed channels; with pruned=
    (and model=) the module takes those values — through the Transposes spa folded too — and
    equals the compensated ONNX model, which the slicing alone does not."""
    module, inputs = build(name)
    path = export(module, inputs, tmp_path / "model.onnx", setting)
    pruned, report = spa_compiler.compile(path, ratio=0.5, criterion="obspa", round_to=1)
    assert report.groups_pruned > 0 and report.statistics is not None
    sliced_only = apply_plan(build(name)[0], report.plan, model=path)
    with pytest.raises(AssertionError):  # the refit is real: slicing alone is not the model
        assert_same_outputs(sliced_only, inputs, pruned)
    with warnings.catch_warnings():
        warnings.simplefilter("error", spa_compiler.errors.SpaWarning)
        apply_plan(module, report.plan, model=path, pruned=pruned)
    assert_same_outputs(module, inputs, pruned)
    if name == "cnn" and setting == "torchscript":  # paths work too
        pruned_path = tmp_path / "pruned.onnx"
        onnx.save(pruned, pruned_path)
        again, _ = build(name)
        apply_plan(again, report.plan, model=path, pruned=pruned_path)
        assert_same_outputs(again, inputs, pruned)


def test_a_refit_the_export_changed_is_named_not_carried(tmp_path):
    """dynamo fuses BatchNorm into the conv before it: the ONNX conv weight is not the
    module's, so its refit cannot go back; apply_plan says which, and carries the rest."""
    module, inputs = build("cnn")
    path = export(module, inputs, tmp_path / "model.onnx", "dynamo")
    pruned, report = spa_compiler.compile(path, ratio=0.5, criterion="obspa", round_to=1)
    with pytest.warns(spa_compiler.errors.SpaWarning, match="could not be carried"):
        apply_plan(module, report.plan, model=path, pruned=pruned)
    with pytest.raises(spa_compiler.BadInputError, match="needs model="):
        apply_plan(build("cnn")[0], report.plan, pruned=pruned)
    other, _ = spa_compiler.compile(path, ratio=0.25, criterion="obspa", round_to=1)
    with pytest.raises(spa_compiler.BadInputError, match="another plan"):
        apply_plan(build("cnn")[0], report.plan, model=path, pruned=other)


class ReadTwice(nn.Module):
    """``b.weight`` read by its Linear and again transposed: TorchScript exports one
    initializer and a Transpose, which spa folds into a tensor of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(20, 32)
        self.b = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h) + h @ self.b.weight.t()


def test_a_weight_refit_apart_in_two_reads_is_named_not_carried(tmp_path):
    """OBSPA refits the two reads of one module weight differently (the Gemm with its bias,
    the folded transposed copy without): one tensor cannot hold both, so neither is carried
    (the last one read used to win silently) and a SpaWarning names the weight. Without
    compensation both reads are the sliced original: carried, no warning."""
    torch.manual_seed(0)
    module, inputs = ReadTwice().eval(), (torch.randn(8, 20),)
    path = export(module, inputs, tmp_path / "model.onnx", "torchscript")
    pruned, report = spa_compiler.compile(path, ratio=0.5, criterion="obspa", round_to=1)
    assert "/Transpose_output_0" in {t.name for t in pruned.graph.initializer}
    with pytest.warns(spa_compiler.errors.SpaWarning, match="'b.weight' as"):
        apply_plan(module, report.plan, model=path, pruned=pruned)
    torch.manual_seed(0)
    expected = apply_plan(ReadTwice().eval(), report.plan, model=path)
    assert torch.equal(module.b.weight, expected.b.weight)  # its sliced original values
    plain, plain_report = spa_compiler.compile(
        path, ratio=0.5, criterion="obspa", round_to=1, compensate=False
    )
    torch.manual_seed(0)
    again = ReadTwice().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", spa_compiler.errors.SpaWarning)
        apply_plan(again, plain_report.plan, model=path, pruned=plain)
    assert_same_outputs(again, inputs, plain)


@pytest.mark.parametrize(
    ("name", "setting"), [("cnn", "torchscript"), ("mlp", "torchscript"), ("cnn", "dynamo")]
)
def test_a_pruned_model_of_another_plan_of_the_same_shapes_is_refused(tmp_path, name, setting):
    """l1 and OBSPA keep as many channels but different ones: a model compiled with the other
    plan has every shape right, and used to be copied in silently (TorchScript: the module
    became that model, its plan's attributes kept; dynamo: a mix, warned as a fused
    BatchNorm). Tensors compensation never changes (the first layer, norm scales) tell."""
    module, inputs = build(name)
    path = export(module, inputs, tmp_path / "model.onnx", setting)
    _, report = spa_compiler.compile(path, ratio=0.5, criterion="obspa", round_to=1)
    other, other_report = spa_compiler.compile(path, ratio=0.5, criterion="l1", round_to=1)
    assert [g.keep for g in report.plan.groups] != [g.keep for g in other_report.plan.groups]
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(spa_compiler.BadInputError, match="another plan"):
        apply_plan(module, report.plan, model=path, pruned=other)
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize(
    ("name", "setting"),
    [("grouped", "torchscript"), ("conv-transpose", "torchscript"), ("hf-attention", "dynamo-raw")],
)
def test_refit_carried_without_a_false_refusal(tmp_path, name, setting):
    """The other-plan check knows which tensors compensation may change: grouped convs,
    ConvTranspose and attention carry their refit without a refusal or a warning."""
    module, inputs = build(name)
    path = export(module, inputs, tmp_path / "model.onnx", setting)
    pruned, report = spa_compiler.compile(path, ratio=0.5, criterion="obspa", round_to=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", spa_compiler.errors.SpaWarning)
        apply_plan(module, report.plan, model=path, pruned=pruned)
    assert_same_outputs(module, inputs, pruned)
