"""The coupled-channel analysis on the architecture corpus: 40 torch models, each exported by
the legacy exporter at opsets 13 and 17 and by the dynamo exporter, plus hand-built graphs.

Expectations come from the architectures (see tests/architectures.py), not from snapshots:
``PRUNABLE`` lists, per model, the channel count of every prunable group, with the reason in a
comment. Every prunable group is also checked by the exactness oracle.
"""

from __future__ import annotations

import json

import pytest
from architectures import ARCHITECTURES, EXPORTERS
from handmade import HANDMADE, NOT_RUNNABLE_IN_ORT
from oracle import check_groups

import spa_compiler

# Channel counts of the prunable groups (sorted). Residual trunks are one group per stage;
# each conv/linear whose output is read only by the next layer is a group of its own.
PRUNABLE: dict[str, list[int]] = {
    # stem+stage trunks 8/16/32 (coupled across the adds), plus each block's inner conv
    "resnet_basic": [8, 8, 8, 16, 16, 16, 32, 32],
    "resnet_bottleneck": [4, 4, 4, 4, 8, 8, 16, 32],
    "densenet": [4, 4, 4, 4, 4, 8, 8, 8, 8, 8, 8, 10],
    "mobilenet_v2": [8, 12, 16, 16, 32, 32, 48, 48, 64],
    "mobilenet_v3": [4, 12, 16, 16, 16, 24, 32, 32, 48, 48, 64, 64],
    # grouped convs (groups=4) couple their input and output groups: units of whole groups
    "resnext": [4, 4, 4, 16, 32],
    "shufflenet_v2": [4, 4, 8, 8, 8, 8, 8, 16, 16, 32],
    "efficientnet": [2, 4, 4, 4, 8, 16, 16, 24, 32, 32, 64, 64],
    # the residual stream is LayerNorm'ed: only the MLP's inner width is exactly prunable
    "convnext": [64, 128],
    "inception": [4, 4, 6, 6, 8, 8, 8, 8, 8, 8, 8, 12, 16],
    "unet": [8, 8, 8, 8, 8, 16, 16, 16, 16, 16, 32, 32],
    "fpn_yolo": [6, 6, 8, 16, 16, 20, 32],
    "vgg": [8, 16, 16, 32, 64],
    "squeezenet": [4, 4, 8, 8, 8, 8, 8, 12, 12, 16],
    "ghostnet": [5, 5, 6, 8, 10, 10, 13],
    "csp": [8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 32, 32],
    "res2net": [4, 4, 4, 4, 4, 6, 6, 6, 6, 16],
    "senet": [4, 8, 16, 16, 32, 32],
    # GroupNorm(4): whole norm groups; trunk 16 channels (units of 4), conv3 32 (units of 8)
    "groupnorm_cnn": [4, 4],
    "instancenorm_cnn": [16, 32],
    "prelu_cnn": [16, 32],
    "tcn_conv1d": [16, 16, 16, 32, 32],
    "xception": [8, 16, 24, 24, 24, 24, 32],
    "pixel_shuffle_sr": [8, 16],
    # depthwise/grouped ConvTranspose (groups=2): two units of whole groups
    "conv_transpose_grouped": [2],
    "aspp": [8, 8, 8, 16, 16, 16],
    "cbam": [4, 16],
    "mlp": [48, 64],
    "mlp_bn": [48, 64],
    "lstm_model": [],
    "gru_model": [],
    # transformers: per layer the attention heads (4) and the MLP's inner width (64/128);
    # the hidden size is normalized by LayerNorm/RMSNorm and stays
    "vit": [4, 4, 64, 64],
    "bert": [4, 4, 64, 64],
    "gpt2": [4, 4, 128, 128],
    # grouped-query attention: 2 kv heads, each owning 2 query heads
    "llama": [2, 2, 64, 64],
    "mlp_mixer": [32, 32, 64, 64],
    "transformer_decoder": [4, 4, 4, 4, 64, 64],
    "torch_transformer_decoder": [64, 64],
    "einsum_attention": [4, 64],
    "sdpa_transformer": [4, 64],
}

OVERRIDES: dict[tuple[str, str], list[int]] = {
    # dynamo shares one ones/zeros InstanceNormalization parameter pair between the three
    # GroupNorms: a shared parameter must be pruned alike, so both groups merge into one.
    ("groupnorm_cnn", "dynamo"): [4],
    # dynamo decomposes scaled_dot_product_attention by folding the heads into the batch
    # ([B, H, S, D] -> [B*H, S, D]) with a size shape inference leaves unnamed, so spa cannot
    # prove where the heads went and blocks them (reason asserted below).
    ("sdpa_transformer", "dynamo"): [64],
    ("torch_transformer_decoder", "dynamo"): [64],
}

# Granularity (indices per removable unit) of the prunable groups with units wider than 1.
GRANULARITY: dict[str, list[int]] = {
    "resnext": [2, 2, 4],  # channels per conv group
    "shufflenet_v2": [2, 4],  # channel shuffle: a unit is one column of the (g, C/g) grid
    "groupnorm_cnn": [4, 8],
    "conv_transpose_grouped": [8],
    "vit": [24, 24],  # fused qkv: 3 x head size
    "bert": [8, 8],  # head size
    "gpt2": [24, 24],
    "llama": [16, 16],  # 2 query heads x head size
}

# Words that must appear among the blocked reasons.
REASONS: dict[str, list[str]] = {
    "lstm_model": ["recurrent op"],
    "gru_model": ["recurrent op"],
    "convnext": ["LayerNorm"],
    "bert": ["LayerNorm", "Softmax axis", "gathered by indices known only at run time"],
    "llama": ["RMSNorm pattern"],
    "pixel_shuffle_sr": ["no channel rule for op DepthToSpace"],
    "cbam": ["reduced by"],
    "vit": ["Softmax axis"],
}

CASES = [(arch, exporter) for arch in ARCHITECTURES for exporter in EXPORTERS]


def test_expectations_cover_the_corpus():
    assert set(PRUNABLE) == set(ARCHITECTURES)
    assert len(ARCHITECTURES) >= 30


@pytest.mark.parametrize(("arch", "exporter"), CASES, ids=[f"{a}-{e}" for a, e in CASES])
def test_corpus_analysis(exported_model, arch, exporter):
    path = exported_model(arch, exporter)
    model = spa_compiler.load(path)
    analysis = spa_compiler.inspect(model)

    expected = OVERRIDES.get((arch, exporter), PRUNABLE[arch])
    assert sorted(g.channels for g in analysis.prunable) == expected
    if arch in GRANULARITY and (arch, exporter) not in OVERRIDES:
        wide = sorted(g.granularity for g in analysis.prunable if g.granularity > 1)
        assert wide == GRANULARITY[arch]
    reasons = " | ".join(r for g in analysis.blocked for r in g.blocked_reasons)
    for word in REASONS.get(arch, []):
        assert word in reasons, f"{word!r} not among the blocked reasons"
    if arch == "torch_transformer_decoder" or ((arch, exporter) in OVERRIDES and "sdpa" in arch):
        # nn.MultiheadAttention folds heads into the batch dim: heads blocked, with reason
        assert "mixes axes spa cannot factor" in reasons
    for group in analysis.prunable:
        assert group.channels >= 2 and group.weight_members and not group.blocked_reasons
    for group in analysis.blocked:
        assert group.blocked_reasons  # every blocked group says why
    assert 0.0 <= analysis.coverage <= 1.0
    json.dumps(analysis.to_json())
    check_groups(model, analysis, limit=3)


@pytest.mark.parametrize("name", sorted(HANDMADE))
def test_handmade_graphs(name):
    model = spa_compiler.from_proto(HANDMADE[name]())
    analysis = spa_compiler.inspect(model)
    reasons = " | ".join(r for g in analysis.blocked for r in g.blocked_reasons)
    expected = {
        "with_lstm": "recurrent op",
        "with_if": "crosses a If sub-graph",
        "loop_scan": "crosses a Loop sub-graph",
        "quantized_ops": "no channel rule for op MatMulInteger",
        "paddle_style_layernorm": "LayerNorm/RMSNorm pattern",
    }
    if name in expected:
        assert expected[name] in reasons
        assert not analysis.prunable
    if name == "unknown_op":
        assert not any(
            g.prunable for g in analysis.groups if any("mystery" in m.tensor for m in g.members)
        )
    if name in ("constant_node_weights",) or name.startswith("conv_gemm_opset"):
        assert sorted(g.channels for g in analysis.prunable) == [8, 16]
    if name == "group_normalization":
        assert [(g.channels, g.granularity) for g in analysis.prunable] == [(4, 4)]
    if name not in NOT_RUNNABLE_IN_ORT:
        check_groups(model, analysis, limit=4)


def _signature(analysis) -> list[tuple]:
    """The groups that hold weights (the converter adds constant operands, axes, of its own)."""
    return [
        (g.channels, g.granularity, g.prunable, sorted((m.tensor, m.axis) for m in g.members))
        for g in analysis.groups
        if g.weight_members
    ]


# The IR version ONNX pairs with each opset (onnx.helper.VERSION_TABLE).
IR_FOR_OPSET = {22: 10, 23: 11}


@pytest.mark.parametrize("opset", sorted(IR_FOR_OPSET))
@pytest.mark.parametrize("name", sorted(HANDMADE))
def test_handmade_graphs_at_opsets_22_and_23(name, opset):
    """Each hand-built graph converted to opset 22/23 by ONNX's version converter gives the
    analysis it gives at its own opset, and its prunable groups pass the oracle."""
    import onnx
    from onnx import version_converter

    original = HANDMADE[name]()
    converted = version_converter.convert_version(original, opset)
    converted.ir_version = max(converted.ir_version, IR_FOR_OPSET[opset])
    onnx.checker.check_model(converted, full_check=True)
    assert converted.opset_import[0].version == opset
    model = spa_compiler.from_proto(converted)
    analysis = spa_compiler.inspect(model)
    assert _signature(analysis) == _signature(spa_compiler.inspect(original))
    if name not in NOT_RUNNABLE_IN_ORT:
        check_groups(model, analysis, limit=4)
