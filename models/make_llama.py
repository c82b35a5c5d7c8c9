"""Generate a Llama-style decoder as ONNX with random weights, in external data.

    python models/make_llama.py out.onnx [--hidden 4096 --layers 32 --heads 32 --kv-heads 32
        --ffn 11008 --vocab 32000 --dtype float32|float16 --seed 0]

Token embedding (Gather), per layer RMSNorm → q/k/v projections → multi-head attention (heads
split by Reshape/Transpose, grouped-query when --kv-heads < --heads) → output projection →
residual, RMSNorm → SwiGLU MLP (gate, up, down) → residual; final RMSNorm and LM head. Rotary
embeddings and the causal mask are left out: neither changes which channels are coupled, and
they keep the graph small. Weights are N(0, 0.02²) from a seeded generator, written to
``<out>.data`` so models above 2 GB work. Defaults are Llama-2-7B's sizes; the tests use tiny
ones, the large-model benchmark ~2 GB.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18


class _Builder:
    def __init__(self, dtype: np.dtype, seed: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.weights: list[onnx.TensorProto] = []
        self.dtype = dtype
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        self.count += 1
        output = f"{name}_{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def weight(self, name: str, shape: tuple[int, ...], fill: float | None = None) -> str:
        if fill is None:
            values = self.rng.standard_normal(shape, dtype=np.float32) * 0.02
        else:
            values = np.full(shape, fill, dtype=np.float32)
        self.weights.append(numpy_helper.from_array(values.astype(self.dtype), name))
        return name

    def constant(self, name: str, values) -> str:
        self.weights.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def rms_norm(self, x: str, prefix: str, hidden: int) -> str:
        squared = self.op("Mul", [x, x], f"{prefix}_sq")
        mean = self.op("ReduceMean", [squared, "axes_last"], f"{prefix}_mean", keepdims=1)
        root = self.op("Sqrt", [self.op("Add", [mean, "eps"], f"{prefix}_eps")], f"{prefix}_rms")
        scaled = self.op("Div", [x, root], f"{prefix}_div")
        return self.op("Mul", [scaled, self.weight(f"{prefix}.weight", (hidden,), 1.0)], prefix)


def build(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int,
          dtype: str = "float32", seed: int = 0) -> onnx.ModelProto:  # fmt: skip
    if hidden % heads or heads % kv_heads:
        raise ValueError("--hidden must divide by --heads, and --heads by --kv-heads")
    np_dtype = np.dtype(dtype)
    head_dim, group = hidden // heads, heads // kv_heads
    b = _Builder(np_dtype, seed)
    b.constant("axes_last", np.array([-1], dtype=np.int64))
    b.constant("eps", np.array(1e-5, dtype=np_dtype))
    b.constant("scale", np.array(1 / np.sqrt(head_dim), dtype=np_dtype))
    b.constant("q_shape", np.array([0, 0, kv_heads, group, head_dim], dtype=np.int64))
    b.constant("kv_shape", np.array([0, 0, kv_heads, 1, head_dim], dtype=np.int64))
    b.constant("merged_shape", np.array([0, 0, hidden], dtype=np.int64))
    x = b.op("Gather", [b.weight("embed_tokens.weight", (vocab, hidden)), "input_ids"], "embed")
    for layer in range(layers):
        p = f"layers.{layer}"
        h = b.rms_norm(x, f"{p}.input_layernorm", hidden)
        q = b.op("MatMul", [h, b.weight(f"{p}.q_proj", (hidden, hidden))], f"{p}.q")
        k = b.op("MatMul", [h, b.weight(f"{p}.k_proj", (hidden, kv_heads * head_dim))], f"{p}.k")
        v = b.op("MatMul", [h, b.weight(f"{p}.v_proj", (hidden, kv_heads * head_dim))], f"{p}.v")
        # [B, S, KV, G, D] -> [B, KV, G, S, D]; k and v keep G = 1 and broadcast over it.
        q5 = b.op("Transpose", [b.op("Reshape", [q, "q_shape"], f"{p}.q5")], f"{p}.qt",
                  perm=[0, 2, 3, 1, 4])  # fmt: skip
        k5 = b.op("Transpose", [b.op("Reshape", [k, "kv_shape"], f"{p}.k5")], f"{p}.kt",
                  perm=[0, 2, 3, 4, 1])  # fmt: skip
        v5 = b.op("Transpose", [b.op("Reshape", [v, "kv_shape"], f"{p}.v5")], f"{p}.vt",
                  perm=[0, 2, 3, 1, 4])  # fmt: skip
        scores = b.op("Mul", [b.op("MatMul", [q5, k5], f"{p}.qk"), "scale"], f"{p}.scores")
        weights = b.op("Softmax", [scores], f"{p}.softmax", axis=-1)
        context = b.op("MatMul", [weights, v5], f"{p}.context")
        merged = b.op("Transpose", [context], f"{p}.ctx_t", perm=[0, 3, 1, 2, 4])
        merged = b.op("Reshape", [merged, "merged_shape"], f"{p}.merged")
        attn = b.op("MatMul", [merged, b.weight(f"{p}.o_proj", (hidden, hidden))], f"{p}.o")
        x = b.op("Add", [x, attn], f"{p}.residual_attn")
        h = b.rms_norm(x, f"{p}.post_attention_layernorm", hidden)
        gate = b.op("MatMul", [h, b.weight(f"{p}.gate_proj", (hidden, ffn))], f"{p}.gate")
        up = b.op("MatMul", [h, b.weight(f"{p}.up_proj", (hidden, ffn))], f"{p}.up")
        silu = b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{p}.sigmoid")], f"{p}.silu")
        down_in = b.op("Mul", [silu, up], f"{p}.swiglu")
        down = b.op("MatMul", [down_in, b.weight(f"{p}.down_proj", (ffn, hidden))], f"{p}.down")
        x = b.op("Add", [x, down], f"{p}.residual_mlp")
    x = b.rms_norm(x, "norm", hidden)
    b.op("MatMul", [x, b.weight("lm_head", (hidden, vocab))], "lm_head")
    b.nodes[-1].output[0] = "logits"  # the graph output keeps its conventional name
    elem = helper.np_dtype_to_tensor_dtype(np_dtype)
    graph = helper.make_graph(
        b.nodes, "llama_style",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", elem, ["batch", "sequence", vocab])],
        initializer=b.weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def save(model: onnx.ModelProto, path: pathlib.Path) -> None:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=pathlib.Path)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = build(args.hidden, args.layers, args.heads, args.kv_heads or args.heads, args.ffn,
                  args.vocab, args.dtype, args.seed)  # fmt: skip
    save(model, args.output)
    weights = sum(np.prod(t.dims) * np.dtype(args.dtype).itemsize for t in model.graph.initializer)
    print(f"wrote {args.output} (+ .data): {weights / 1e9:.2f} GB of weights")


if __name__ == "__main__":
    main()
