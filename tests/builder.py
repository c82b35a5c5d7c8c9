"""A tiny helper to write ONNX graphs by hand for rule tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    def __init__(self, opset: int = 17, seed: int = 0) -> None:
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.count = 0
        self.ranks: dict[str, int] = {}

    def input(self, name: str, shape: list, dtype: int = TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def weight(self, name: str, shape: list[int], scale: float = 0.5) -> str:
        array = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(
        self, op_type: str, inputs: list[str], n_out: int = 1, name: str | None = None, **attrs
    ) -> str | list[str]:
        self.count += 1
        node_name = name or f"{op_type.lower()}{self.count}"
        outs = [f"{node_name}_out{i}" if n_out > 1 else f"{node_name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, **attrs))
        return outs if n_out > 1 else outs[0]

    def conv(
        self,
        x: str,
        c_in: int,
        c_out: int,
        k: int = 3,
        group: int = 1,
        name: str | None = None,
        bias: bool = True,
    ) -> str:
        self.count += 1
        node_name = name or f"conv{self.count}"
        w = self.weight(f"{node_name}.weight", [c_out, c_in // group, k, k])
        inputs = [x, w]
        if bias:
            inputs.append(self.weight(f"{node_name}.bias", [c_out]))
        return self.op("Conv", inputs, name=node_name, pads=[k // 2] * 4, group=group)

    def output(
        self,
        name: str,
        dtype: int = TensorProto.FLOAT,
        shape: list | None = None,
        rank: int | None = None,
    ) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
        if rank is not None:
            self.ranks[name] = rank

    def model(self, ir_version: int = 8) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "g", self.inputs, self.outputs, self.inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=ir_version
        )
        # Graph outputs were declared without shapes: let ONNX fill them in.
        inferred = onnx.shape_inference.infer_shapes(model)
        for output in model.graph.output:
            for value in [*inferred.graph.value_info, *inferred.graph.output]:
                if value.name == output.name and value.type.tensor_type.HasField("shape"):
                    output.type.CopyFrom(value.type)
            if not output.type.tensor_type.HasField("shape") and output.name in self.ranks:
                # ONNX cannot infer through some function ops (Mish): declare the rank only.
                dims = [f"{output.name}_d{i}" for i in range(self.ranks[output.name])]
                output.type.CopyFrom(
                    helper.make_tensor_type_proto(output.type.tensor_type.elem_type, dims)
                )
        onnx.checker.check_model(model)
        return model
