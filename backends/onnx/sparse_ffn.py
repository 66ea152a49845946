"""One layer's FFN in ONNX: the `ai.tscompile::SparseFFN` node with its function body, and the dense form.

SparseFFN (domain ai.tscompile, version 1):
    inputs   X [..., H] float; Wg, Wu, WdT [I, H] float or float16 (rows = neurons);
             fc1 [R, H], fc2 [I, R] float (only with gating "predictor")
    output   Y [..., H] float
    attributes
      activation           "swiglu" | "geglu" | "relu" | "drelu"
      gating               "predictor": neuron j is computed iff fc2[j] . relu(fc1 . x) >= predictor_threshold
                           "gate": g = Wg x is computed densely, u and the down projection only where
                           act(g) != 0 (relu kinds; swiglu/geglu compute u densely and skip only down rows)
      threshold            h_j = 0 where |h_j| <= threshold
      predictor_threshold  see gating
      predictor_relu       1: fc2 . relu(fc1 . x); 0: fc2 . (fc1 . x)
The function body is specialised per (activation, gating, predictor_relu, weight dtype) through the
FunctionProto `overload` field (IR version 10), so one model can mix kinds; the native kernel reads the same
attributes.
Several tokens in one call (batch > 1) gather the union of their active rows and mask per token: exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tscompile.ir import RELU_KINDS

from .builder import DOMAIN, OPSET, GraphBuilder

OP_TYPE = "SparseFFN"


@dataclass(frozen=True)
class Variant:
    activation: str
    gating: str  # predictor | gate
    predictor_relu: bool = True
    fp16: bool = False

    @property
    def overload(self) -> str:
        parts = [self.activation, self.gating]
        if self.gating == "predictor" and not self.predictor_relu:
            parts.append("linear")
        if self.fp16:
            parts.append("f16")
        return "_".join(parts)


def activate(b, kind: str, g: str, u: str, path: str) -> str:
    """h = act(g) * u (drelu: relu(g) * relu(u)) with standard ops."""
    if kind == "swiglu":
        a = b.op("Mul", [g, b.op("Sigmoid", [g], path)], path)
    elif kind == "geglu":
        a = b.op("Gelu", [g], path, approximate="tanh")
    elif kind in RELU_KINDS:
        a = b.op("Relu", [g], path)
        if kind == "drelu":
            u = b.op("Relu", [u], path)
    else:
        raise ValueError(f"unknown activation {kind!r}")
    return b.op("Mul", [a, u], path)


class _Body:
    """Minimal node writer for a function body (names only need to be unique inside the function)."""

    def __init__(self):
        self.nodes: list = []
        self._n = 0

    def op(self, op_type: str, inputs: list[str], path: str = "", outputs: int = 1, **attrs):
        from onnx import helper

        self._n += 1
        outs = [f"t{self._n}_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self._n}", **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        from onnx import numpy_helper

        return self.op("Constant", [], value=numpy_helper.from_array(np.asarray(value, dtype=dtype)))

    def attr_const(self, attr: str) -> str:
        """A float Constant taking its value from the calling node's attribute `attr` (ref_attr_name)."""
        from onnx import AttributeProto, helper

        a = AttributeProto(name="value_float", ref_attr_name=attr, type=AttributeProto.FLOAT)
        self._n += 1
        out = f"t{self._n}_0"
        node = helper.make_node("Constant", [], [out], name=f"Constant_{self._n}")
        node.attribute.append(a)
        self.nodes.append(node)
        return out

    def rows(self, w: str, idx: str, fp16: bool) -> str:
        """Rows idx of a [I, H] weight, as float."""
        r = self.op("Gather", [w, idx], axis=0)
        return self.op("Cast", [r], to=1) if fp16 else r


def function_proto(v: Variant):
    """The model-local FunctionProto implementing SparseFFN for one variant, in standard ops."""
    from onnx import helper

    b = _Body()
    x = b.op("Flatten", ["X"], axis=-1)  # [N, H]
    t = b.attr_const("threshold")
    zero = b.const(0.0, np.float32)
    flat = b.const([-1])
    if v.gating == "predictor":
        z = b.op("Gemm", [x, "fc1"], transB=1)  # [N, R]
        if v.predictor_relu:
            z = b.op("Relu", [z])
        logit = b.op("Gemm", [z, "fc2"], transB=1)  # [N, I]
        pt = b.attr_const("predictor_threshold")
        keep = b.op("GreaterOrEqual", [logit, pt])  # [N, I] per-token gate
        best = b.op("ReduceMax", [logit, b.const([0])], keepdims=0)  # [I]  union over tokens
        idx = b.op("Reshape", [b.op("NonZero", [b.op("GreaterOrEqual", [best, pt])]), flat])  # [k]
        g = b.op("Gemm", [x, b.rows("Wg", idx, v.fp16)], transB=1)  # [N, k]
        u = b.op("Gemm", [x, b.rows("Wu", idx, v.fp16)], transB=1)  # [N, k]
        h = activate(b, v.activation, g, u, "")
        mask = b.op("And", [b.op("Greater", [b.op("Abs", [h]), t]), b.op("Gather", [keep, idx], axis=1)])
        h = b.op("Where", [mask, h, zero])
    elif v.activation in RELU_KINDS:
        wg = b.op("Cast", ["Wg"], to=1) if v.fp16 else "Wg"
        g = b.op("Gemm", [x, wg], transB=1)  # [N, I]
        best = b.op("ReduceMax", [g, b.const([0])], keepdims=0)  # [I]
        idx = b.op("Reshape", [b.op("NonZero", [b.op("Greater", [best, zero])]), flat])  # [k]
        u = b.op("Gemm", [x, b.rows("Wu", idx, v.fp16)], transB=1)  # [N, k]
        h = activate(b, v.activation, b.op("Gather", [g, idx], axis=1), u, "")
        h = b.op("Where", [b.op("Greater", [b.op("Abs", [h]), t]), h, zero])
    else:
        wg, wu = ((b.op("Cast", [w], to=1) if v.fp16 else w) for w in ("Wg", "Wu"))
        h = activate(b, v.activation, b.op("Gemm", [x, wg], transB=1), b.op("Gemm", [x, wu], transB=1), "")
        big = b.op("Greater", [b.op("Abs", [h]), t])  # [N, I]
        best = b.op("ReduceMax", [b.op("Abs", [h]), b.const([0])], keepdims=0)
        idx = b.op("Reshape", [b.op("NonZero", [b.op("Greater", [best, t])]), flat])  # [k]
        h = b.op("Gather", [b.op("Where", [big, h, zero]), idx], axis=1)  # [N, k]
    y = b.op("MatMul", [h, b.rows("WdT", idx, v.fp16)])  # [N, H]
    b.nodes.append(helper.make_node("Reshape", [y, b.op("Shape", ["X"])], ["Y"], name="Reshape_out"))
    inputs = ["X", "Wg", "Wu", "WdT"] + (["fc1", "fc2"] if v.gating == "predictor" else [])
    f = helper.make_function(
        DOMAIN,
        OP_TYPE,
        inputs,
        ["Y"],
        b.nodes,
        [helper.make_opsetid("", OPSET)],
        attributes=["activation", "gating", "threshold", "predictor_threshold", "predictor_relu"],
    )
    f.overload = v.overload
    f.doc_string = f"SparseFFN {v.overload}: see tscompile.backends.onnx.sparse_ffn"
    return f


def sparse_ffn_node(
    b: GraphBuilder, x: str, w: dict[str, str], ann, fp16: bool, path: str, functions: dict
) -> str:
    """Add one SparseFFN node for annotation `ann` (mode exact or predictor); register its function body."""
    gating = "predictor" if ann.mode == "predictor" else "gate"
    pred = ann.predictor
    v = Variant(ann.activation, gating, pred.relu if (pred and gating == "predictor") else True, fp16)
    functions.setdefault(v, function_proto(v))
    inputs = [x, w["gate"], w["up"], w["down_t"]] + ([w["fc1"], w["fc2"]] if gating == "predictor" else [])
    node_out = b.op(
        OP_TYPE,
        inputs,
        path,
        domain=DOMAIN,
        activation=ann.activation,
        gating=gating,
        threshold=float(ann.threshold),
        predictor_threshold=float(pred.threshold) if gating == "predictor" else 0.0,
        predictor_relu=int(v.predictor_relu),
    )
    b.nodes[-1].overload = v.overload
    return node_out


def dense_ffn(
    b: GraphBuilder, x: str, w: dict[str, str], ann, path: str, rows: bool, fp16: bool = False
) -> str:
    """The exact FFN (no predictor): h = act(x Wg^T) * (x Wu^T), |h| <= t zeroed, then down.

    rows=True: weights are the sparse layout [I, H] (Gemm transB on a 2-D view); rows=False: MatMul layout
    (Wg^T, Wu^T [H, I]) as an ordinary exporter writes it. The down weight is [I, H] in both.
    """

    def cast(name):
        return b.op("Cast", [name], path, to=1) if fp16 else name

    if rows:
        x2 = b.op("Flatten", [x], path, axis=-1)
        g = b.op("Gemm", [x2, cast(w["gate"])], f"{path}/gate_proj", transB=1)
        u = b.op("Gemm", [x2, cast(w["up"])], f"{path}/up_proj", transB=1)
    else:
        g = b.op("MatMul", [x, w["gate"]], f"{path}/gate_proj")
        u = b.op("MatMul", [x, w["up"]], f"{path}/up_proj")
    h = activate(b, ann.activation, g, u, f"{path}/act_fn")
    if ann.threshold > 0:
        big = b.op("Greater", [b.op("Abs", [h], path), b.const(ann.threshold, np.float32)], path)
        h = b.op("Where", [big, h, b.const(0.0, np.float32)], path)
    y = b.op("MatMul", [h, cast(w["down_t"])], f"{path}/down_proj")
    return b.op("Reshape", [y, b.op("Shape", [x], path)], path) if rows else y
