"""A small ONNX graph writer over `onnx.helper`: path-like node names, constants, weights.

Nodes are named like ORT-GenAI's builder (`/model/layers.0/self_attn/q_proj/MatMul`) and their outputs
`<node name>/output_0`, so a profile or a graph viewer reads like the model. Weights go to a `WeightStore`,
which embeds them in the model or, for large models, streams them into one external data file as they are
made (a 7B model never sits in memory twice).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tscompile.cache import atomic_file

OPSET = 21  # Gelu(approximate="tanh") needs 20; IR version 10 covers up to 21
IR_VERSION = 10  # onnx 1.23 writes 14, which onnxruntime 1.31 rejects
DOMAIN = "ai.tscompile"
EXTERNAL_ALIGN = 4096


class WeightStore:
    """Initializers of one model: embedded raw data, or appended to `data_path` (external data)."""

    def __init__(self, data_path: Path | None = None):
        self.data_path = data_path
        self.tensors: list = []  # onnx.TensorProto
        self.names: set[str] = set()
        self._file = open(data_path, "wb") if data_path is not None else None

    def add(self, name: str, array: np.ndarray) -> str:
        from onnx import TensorProto, helper, numpy_helper

        if name in self.names:
            return name
        array = np.ascontiguousarray(array)
        if self._file is None:
            self.tensors.append(numpy_helper.from_array(array, name))
        else:
            # pad so every tensor starts on a page: ORT can memory-map aligned external data
            offset = self._file.tell()
            pad = -offset % EXTERNAL_ALIGN
            self._file.write(b"\0" * pad)
            offset += pad
            self._file.write(array.tobytes())
            t = TensorProto(
                name=name, dims=list(array.shape), data_type=helper.np_dtype_to_tensor_dtype(array.dtype)
            )
            t.data_location = TensorProto.EXTERNAL
            for k, v in (
                ("location", self.data_path.name),
                ("offset", str(offset)),
                ("length", str(array.nbytes)),
            ):
                t.external_data.add(key=k, value=v)
            self.tensors.append(t)
        self.names.add(name)
        return name

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class GraphBuilder:
    """Collects the nodes of one graph (or subgraph). `op` returns the output name(s) of the node it adds."""

    def __init__(self, weights: WeightStore):
        self.weights = weights
        self.nodes: list = []
        self._counts: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}

    def sub(self) -> GraphBuilder:
        """A builder for a subgraph (If branch) sharing this model's weights and constant names."""
        child = GraphBuilder(self.weights)
        child._counts = self._counts  # node names stay unique across the whole model
        child._consts = dict(self._consts)  # outer-scope constants are visible inside a subgraph
        return child

    def _name(self, path: str, op_type: str) -> str:
        base = f"{path}/{op_type}"
        n = self._counts.get(base, 0)
        self._counts[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def op(
        self,
        op_type: str,
        inputs: list[str],
        path: str,
        outputs: int = 1,
        domain: str = "",
        out_names: list[str] | None = None,
        **attrs,
    ):
        from onnx import helper

        name = self._name(path, op_type)
        outs = out_names or [f"{name}/output_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shapes, axes, scalars) as a Constant node, made once per graph."""
        from onnx import numpy_helper

        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self._name("/model/constants", arr.dtype.name)
            self.nodes.append(_constant_node(name, numpy_helper.from_array(arr, name)))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, array) -> str:
        return self.weights.add(name, array)


def _constant_node(name: str, tensor):
    from onnx import helper

    return helper.make_node("Constant", [], [name], name=name, value=tensor)


def save_model(model, path: Path) -> None:
    """Write `model` (its weights already placed by the WeightStore) to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(model.SerializeToString())
