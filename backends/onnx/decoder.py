"""The whole decoder as one ONNX graph with KV cache, Optimum naming, written with onnx.helper (no tracing).

Inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64 (1 = real token),
         position_ids [batch, seq] int64,
         past_key_values.{i}.key/value [batch, kv_heads, past, head_dim] float
Outputs  logits [batch, seq, vocab] float, present.{i}.key/value [batch, kv_heads, past + seq, head_dim] float

Semantics follow tscompile/reference.py: RMSNorm, HF rotate-half RoPE (angles in float64), grouped-query
attention (kv heads broadcast, never copied), causal order by position in the sequence, sliding window on
position distance, qkv bias (qwen2), tied embeddings, Mixtral experts (router, top-k, one FFN per expert,
experts no token is routed to skipped by an If). Masked scores are set to float32's lowest value
(a query with no valid key, i.e. a padding query, gets a uniform average instead of the reference's zeros).
"""

from __future__ import annotations

import math

import numpy as np

from tscompile.errors import UserError
from tscompile.ir import ModelIR, check_float16_range, ffn_names, predictor_names

from .builder import DOMAIN, IR_VERSION, OPSET, GraphBuilder, WeightStore
from .sparse_ffn import dense_ffn, sparse_ffn_node

FLOAT, DOUBLE, BOOL = 1, 11, 9  # onnx.TensorProto element types


def _np(ir: ModelIR, name: str, transpose: bool = False, fp16: bool = False) -> np.ndarray:
    a = ir.weights[name].detach().float().numpy()
    a = a.T if transpose else a
    if fp16:
        check_float16_range(a, name, "onnx")
    return np.ascontiguousarray(a.astype(np.float16) if fp16 else a)


class _Shared:
    """Values every layer uses: sequence sizes, RoPE tables, the attention mask, the prefill flag."""

    def __init__(self, b: GraphBuilder, ir: ModelIR):
        from tscompile.reference import rope_inv_freq

        cfg = ir.config
        i64 = "/model/sizes"
        seq = b.op("Slice", [b.op("Shape", ["input_ids"], i64), b.const([1]), b.const([2])], i64)  # [1]
        past = b.op("Slice", [b.op("Shape", ["past_key_values.0.key"], i64), b.const([2]), b.const([3])], i64)
        total = b.op("Add", [past, seq], i64)
        self.is_prefill = b.op("Greater", [b.op("Squeeze", [seq], i64), b.const(1)], i64)

        r = "/model/rotary_emb"
        inv = rope_inv_freq(cfg).double().numpy()  # [head_dim / 2]
        pos = b.op("Unsqueeze", [b.op("Cast", ["position_ids"], r, to=DOUBLE), b.const([-1])], r)  # [B, T, 1]
        ang = b.op("Mul", [pos, b.const(inv, np.float64)], r)
        ang = b.op("Concat", [ang, ang], r, axis=-1)  # [B, T, head_dim]
        self.cos, self.sin = (
            b.op("Unsqueeze", [b.op("Cast", [b.op(f, [ang], r)], r, to=FLOAT), b.const([1])], r)
            for f in ("Cos", "Sin")
        )  # [B, 1, T, head_dim]

        m = "/model/attn_mask"
        kidx = b.op("Range", [b.const(0), b.op("Squeeze", [total], m), b.const(1)], m)  # [S]
        qidx = b.op("Range", [b.op("Squeeze", [past], m), b.op("Squeeze", [total], m), b.const(1)], m)  # [T]
        causal = b.op(
            "LessOrEqual",
            [b.op("Unsqueeze", [kidx, b.const([0])], m), b.op("Unsqueeze", [qidx, b.const([1])], m)],
            m,
        )  # [T, S]
        valid = b.op(
            "Unsqueeze", [b.op("Cast", ["attention_mask"], m, to=BOOL), b.const([1])], m
        )  # [B, 1, S]
        mask = b.op("And", [valid, causal], m)  # [B, T, S]
        if cfg.sliding_window:
            # key positions as the reference derives them: real tokens counted from the left
            kpos = b.op(
                "Max",
                [b.op("Sub", [b.op("CumSum", ["attention_mask", b.const(1)], m), b.const(1)], m), b.const(0)],
                m,
            )  # [B, S]
            dist = b.op(
                "Sub",
                [
                    b.op("Unsqueeze", ["position_ids", b.const([2])], m),
                    b.op("Unsqueeze", [kpos, b.const([1])], m),
                ],
                m,
            )  # [B, T, S]
            mask = b.op("And", [mask, b.op("Less", [dist, b.const(cfg.sliding_window)], m)], m)
        self.mask = b.op("Unsqueeze", [mask, b.const([1, 2])], m)  # [B, 1, 1, T, S]


def _rms_norm(b: GraphBuilder, x: str, weight: str, eps: float, path: str) -> str:
    # Pow-ReduceMean-Add-Sqrt-Div-Mul: the pattern ORT fuses into SimplifiedLayerNormalization
    ms = b.op(
        "ReduceMean", [b.op("Pow", [x, b.const(2.0, np.float32)], path), b.const([-1])], path, keepdims=1
    )
    rms = b.op("Sqrt", [b.op("Add", [ms, b.const(eps, np.float32)], path)], path)
    return b.op("Mul", [b.op("Div", [x, rms], path), weight], path)


def _rope(b: GraphBuilder, x: str, sh: _Shared, half: int, path: str) -> str:
    """x [B, heads, T, hd] -> x * cos + rotate_half(x) * sin."""
    lo = b.op("Slice", [x, b.const([0]), b.const([half]), b.const([-1])], path)
    hi = b.op("Slice", [x, b.const([half]), b.const([2 * half]), b.const([-1])], path)
    rot = b.op("Concat", [b.op("Neg", [hi], path), lo], path, axis=-1)
    return b.op("Add", [b.op("Mul", [x, sh.cos], path), b.op("Mul", [rot, sh.sin], path)], path)


def _attention(b: GraphBuilder, ir: ModelIR, i: int, x: str, sh: _Shared) -> str:
    cfg = ir.config
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p, path = f"model.layers.{i}.self_attn", f"/model/layers.{i}/self_attn"

    def proj(name: str, heads: int) -> str:
        y = b.op(
            "MatMul",
            [x, b.weight(f"{p}.{name}.MatMul.weight", _np(ir, f"{p}.{name}.weight", True))],
            f"{path}/{name}",
        )
        if cfg.attention_bias:
            y = b.op(
                "Add",
                [y, b.weight(f"{p}.{name}.bias", _np(ir, f"{p}.{name}.bias"))],
                f"{path}/{name}",
            )
        y = b.op("Reshape", [y, b.const([0, 0, heads, hd])], f"{path}/{name}")
        return b.op("Transpose", [y], f"{path}/{name}", perm=[0, 2, 1, 3])  # [B, heads, T, hd]

    q = _rope(b, proj("q_proj", nh), sh, hd // 2, f"{path}/rotary_q")
    k = _rope(b, proj("k_proj", nkv), sh, hd // 2, f"{path}/rotary_k")
    v = proj("v_proj", nkv)
    k = b.op(
        "Concat", [f"past_key_values.{i}.key", k], f"{path}/k_cache", axis=2, out_names=[f"present.{i}.key"]
    )
    v = b.op(
        "Concat",
        [f"past_key_values.{i}.value", v],
        f"{path}/v_cache",
        axis=2,
        out_names=[f"present.{i}.value"],
    )  # [B, nkv, S, hd]
    # grouped-query attention without copying kv heads: q [B, nkv, rep, T, hd] against k [B, nkv, 1, S, hd]
    q5 = b.op("Reshape", [q, b.const([0, nkv, nh // nkv, -1, hd])], f"{path}/gqa")
    kt = b.op(
        "Transpose",
        [b.op("Unsqueeze", [k, b.const([2])], f"{path}/gqa")],
        f"{path}/gqa",
        perm=[0, 1, 2, 4, 3],
    )
    scores = b.op(
        "Div", [b.op("MatMul", [q5, kt], f"{path}/qk"), b.const(math.sqrt(hd), np.float32)], f"{path}/qk"
    )
    scores = b.op("Where", [sh.mask, scores, b.const(np.finfo(np.float32).min, np.float32)], f"{path}/mask")
    probs = b.op("Softmax", [scores], f"{path}/softmax", axis=-1)  # [B, nkv, rep, T, S]
    out = b.op("MatMul", [probs, b.op("Unsqueeze", [v, b.const([2])], f"{path}/gqa")], f"{path}/pv")
    out = b.op("Reshape", [out, b.const([0, nh, -1, hd])], f"{path}/pv")
    out = b.op(
        "Reshape",
        [b.op("Transpose", [out], f"{path}/pv", perm=[0, 2, 1, 3]), b.const([0, 0, nh * hd])],
        f"{path}/pv",
    )  # [B, T, nh * hd]
    wo = b.weight(f"{p}.o_proj.MatMul.weight", _np(ir, f"{p}.o_proj.weight", True))
    return b.op("MatMul", [out, wo], f"{path}/o_proj")


def _branch(sub: GraphBuilder, y: str, name: str):
    """An If branch: the nodes of `sub`, with output y (a float tensor of any shape)."""
    from onnx import helper

    return helper.make_graph(sub.nodes, name, [], [helper.make_tensor_value_info(y, FLOAT, None)])


def _ffn(
    b: GraphBuilder,
    ir: ModelIR,
    unit: tuple[int, int | None],
    x: str,
    exact: str,
    sparse: bool,
    fp16: bool,
    functions: dict,
) -> str:
    """One FFN (a layer's MLP or one expert). `exact` (a bool value) picks the dense exact FFN, else SparseFFN."""

    i, e = unit
    ann = ir.layers[i] if e is None else ir.layers[i].experts[e]
    gate, up, down = ffn_names(i, e)
    path = f"/model/layers.{i}/mlp" if e is None else f"/model/layers.{i}/block_sparse_moe/experts.{e}"
    where = f"layers[{i}]" if e is None else f"layers[{i}].experts[{e}]"
    if not sparse or ann.mode == "dense":
        w = {
            "gate": b.weight(f"{gate[:-7]}.MatMul.weight", _np(ir, gate, True)),
            "up": b.weight(f"{up[:-7]}.MatMul.weight", _np(ir, up, True)),
            "down_t": b.weight(f"{down[:-7]}.MatMul.weight", _np(ir, down, True)),
        }
        return dense_ffn(b, x, w, ann, path, rows=False)
    # sparse layout: rows of [I, H] per neuron, shared by the exact (dense) and the SparseFFN branch
    w = {
        "gate": b.weight(gate, _np(ir, gate, fp16=fp16)),
        "up": b.weight(up, _np(ir, up, fp16=fp16)),
        "down_t": b.weight(f"{down[:-7]}.weight_t", _np(ir, down, True, fp16)),
    }
    if ann.mode == "predictor":
        if ann.predictor is None:
            raise UserError(f"{where}: mode 'predictor' but the FFN has no predictor")
        fc1, fc2 = predictor_names(i, e)
        w["fc1"] = b.weight(fc1, _np(ir, fc1))
        w["fc2"] = b.weight(fc2, _np(ir, fc2))
    prefill, decode = b.sub(), b.sub()
    y_prefill = dense_ffn(prefill, x, w, ann, f"{path}/prefill", rows=True, fp16=fp16)
    y_decode = sparse_ffn_node(decode, x, w, ann, fp16, f"{path}/SparseFFN", functions)

    return b.op(
        "If",
        [exact],
        path,
        then_branch=_branch(prefill, y_prefill, f"{path}/prefill"),
        else_branch=_branch(decode, y_decode, f"{path}/decode"),
    )


def _moe(
    b: GraphBuilder, ir: ModelIR, i: int, x: str, sh: _Shared, sparse: bool, fp16: bool, functions: dict
):
    """Mixtral block as the reference computes it: softmax router, top-k, weights renormalized over the k, then
    sum over experts e of weight_e * expert_e(x) (a token not routed to e has weight 0 there).

    An expert runs sparse where the reference gates: in decode, and in a prefill that routes exactly one
    token to it (the reference calls the expert on the tokens routed to it, a one-token forward)."""
    cfg = ir.config
    path = f"/model/layers.{i}/block_sparse_moe"
    router = f"model.layers.{i}.block_sparse_moe.gate"
    wr = b.weight(f"{router}.MatMul.weight", _np(ir, f"{router}.weight", True))
    probs = b.op("Softmax", [b.op("MatMul", [x, wr], f"{path}/gate")], f"{path}/gate", axis=-1)  # [B, T, E]
    top, idx = b.op("TopK", [probs, b.const([cfg.num_experts_per_tok])], f"{path}/gate", outputs=2, axis=-1)
    w = b.op(
        "Div", [top, b.op("ReduceSum", [top, b.const([-1])], f"{path}/gate", keepdims=1)], f"{path}/gate"
    )
    y = b.op("ConstantOfShape", [b.op("Shape", [x], path)], path)  # zeros [B, T, H]
    for e in range(cfg.num_experts):
        p = f"{path}/experts.{e}"
        routed = b.op("Equal", [idx, b.const(e)], p)  # [B, T, k]
        weight = b.op(
            "ReduceSum",
            [b.op("Where", [routed, w, b.const(0.0, np.float32)], p), b.const([-1])],
            p,
            keepdims=1,
        )  # [B, T, 1]
        count = b.op("ReduceSum", [b.op("Cast", [routed], p, to=7)], p, keepdims=0)  # tokens routed here
        # an expert no token is routed to is skipped (in decode that is all but top-k of them)
        run = b.sub()
        exact = run.op(
            "And", [sh.is_prefill, run.op("Not", [run.op("Equal", [count, run.const(1)], p)], p)], p
        )
        out = run.op(
            "Add",
            [y, run.op("Mul", [_ffn(run, ir, (i, e), x, exact, sparse, fp16, functions), weight], p)],
            p,
        )
        skip = b.sub()
        kept = skip.op("Identity", [y], p)
        y = b.op(
            "If",
            [b.op("Greater", [count, b.const(0)], p)],
            p,
            then_branch=_branch(run, out, f"{p}/routed"),
            else_branch=_branch(skip, kept, f"{p}/idle"),
        )
    return y


def build_decoder(ir: ModelIR, weights: WeightStore, sparse: bool, fp16: bool = False):
    """The decoder's ModelProto. sparse=False: every FFN dense (the baseline); True: SparseFFN in decode."""
    from onnx import helper

    cfg = ir.config
    b = GraphBuilder(weights)
    sh = _Shared(b, ir)
    embed = b.weight("model.embed_tokens.weight", _np(ir, "model.embed_tokens.weight"))
    x = b.op("Gather", [embed, "input_ids"], "/model/embed_tokens", axis=0)  # [B, T, H]
    functions: dict = {}
    for i in range(cfg.num_layers):
        p, path = f"model.layers.{i}", f"/model/layers.{i}"
        ln1 = b.weight(f"{p}.input_layernorm.weight", _np(ir, f"{p}.input_layernorm.weight"))
        a = _attention(b, ir, i, _rms_norm(b, x, ln1, cfg.rms_norm_eps, f"{path}/input_layernorm"), sh)
        x = b.op("Add", [x, a], f"{path}/residual_attn")
        ln2 = b.weight(
            f"{p}.post_attention_layernorm.weight", _np(ir, f"{p}.post_attention_layernorm.weight")
        )
        h = _rms_norm(b, x, ln2, cfg.rms_norm_eps, f"{path}/post_attention_layernorm")
        if cfg.is_moe:
            y = _moe(b, ir, i, h, sh, sparse, fp16, functions)
        else:
            y = _ffn(b, ir, (i, None), h, sh.is_prefill, sparse, fp16, functions)
        x = b.op("Add", [x, y], f"{path}/residual_mlp")
    normw = b.weight("model.norm.weight", _np(ir, "model.norm.weight"))
    x = _rms_norm(b, x, normw, cfg.rms_norm_eps, "/model/norm")
    # tied embeddings get a transposed copy: MatMul on [H, V] streams rows at batch 1 without prepacking
    # (the sparse model runs unpacked, see runner.py); Gemm with transB on the embedding ran at half the speed
    head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    head = b.weight("lm_head.MatMul.weight", _np(ir, head_name, True))
    b.op("MatMul", [x, head], "/lm_head", out_names=["logits"])

    kv = ["batch_size", cfg.num_kv_heads, "past_sequence_length", cfg.head_dim]
    kv_out = ["batch_size", cfg.num_kv_heads, "total_sequence_length", cfg.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", 7, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", 7, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", 7, ["batch_size", "sequence_length"]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", FLOAT, ["batch_size", "sequence_length", cfg.vocab_size])
    ]
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", FLOAT, kv))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", FLOAT, kv_out))
    graph = helper.make_graph(b.nodes, "tscompile_decoder", inputs, outputs, initializer=weights.tensors)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(DOMAIN, 1)] if functions else [])
    model = helper.make_model(
        graph, opset_imports=opsets, functions=list(functions.values()), producer_name="tscompile"
    )
    model.ir_version = IR_VERSION
    return model
