"""The onnx backend against the reference model: every activation kind, predictor and exact gating,
through the SparseFFN function body (stock ORT) and through the native kernel library."""

from __future__ import annotations

import ctypes
import json
import shutil

import numpy as np
import pytest
from onnx_tiny import FORCED, PROMPT, reference_logits
from tscompile.verify import rel_l2

ACTIVATIONS = ("swiglu", "geglu", "relu", "drelu")
MODES = ("predictor", "exact")


@pytest.mark.parametrize("native", [False, True], ids=["function-body", "native"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_logits_match_reference(lowered, activation, mode, native):
    from tscompile.backends.onnx import BACKEND

    art = lowered(activation, mode)
    assert art.manifest["native_library"] == "libtscompile_ort.so"
    runner = BACKEND.load(art.outdir, native=native)
    assert runner.native is native and runner.prefill == "batched"
    got = runner.logits(PROMPT, FORCED)
    want = reference_logits(art.ir)
    assert got.shape == want.shape == (1 + len(FORCED), art.ir.config.vocab_size)
    assert got.dtype == np.float32
    assert rel_l2(got, want) <= 1e-4
    # the sparse decode really differs from the dense model: the comparison above could not pass by accident
    assert rel_l2(reference_logits(art.source), want) > 1e-3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_greedy_tokens_match_reference(lowered, activation, mode):
    import torch
    from tscompile.backends.onnx import BACKEND

    from tscompile.reference import ReferenceModel

    art = lowered(activation, mode)
    with torch.no_grad():
        want = ReferenceModel.from_ir(art.ir).generate(PROMPT, 32, stop_at_eos=False)
    for native in (False, True):
        assert BACKEND.load(art.outdir, native=native).generate(PROMPT, 32) == want


@pytest.mark.parametrize("mode", MODES)
def test_mixtral_experts_match_reference(lowered, mode):
    """MoE: router, top-2 of 4 experts, every expert a SparseFFN in decode (and in a one-token prefill route)."""
    import torch

    from tscompile.backends.onnx import BACKEND
    from tscompile.reference import ReferenceModel

    art = lowered("drelu", mode, family="mixtral")
    want = reference_logits(art.ir)
    assert rel_l2(reference_logits(art.source), want) > 1e-3
    with torch.no_grad():
        tokens = ReferenceModel.from_ir(art.ir).generate(PROMPT, 32, stop_at_eos=False)
    for native in (False, True):
        runner = BACKEND.load(art.outdir, native=native)
        assert rel_l2(runner.logits(PROMPT, FORCED), want) <= 1e-4
        assert runner.generate(PROMPT, 32) == tokens
    # a two-token prompt routes a single token to some experts: those run gated, as in the reference
    assert rel_l2(BACKEND.load(art.outdir).logits(PROMPT[:2], FORCED[:2]),
                  reference_logits(art.ir, PROMPT[:2], FORCED[:2])) <= 1e-4


def test_dense_export_matches_dense_reference(lowered):
    from tscompile.backends.onnx import BACKEND

    art = lowered("swiglu", "predictor")
    runner = BACKEND.load(art.outdir, dense=True)
    assert not runner.native
    assert rel_l2(runner.logits(PROMPT, FORCED), reference_logits(art.source)) <= 1e-4
    import onnx

    dense = onnx.load(str(art.outdir / "dense" / "model.onnx"))
    sparse = onnx.load(str(art.outdir / "model.onnx"))
    assert not dense.functions and all(n.domain == "" for n in dense.graph.node)
    def io(m):
        return [(i.name, i.type.tensor_type.elem_type) for i in m.graph.input], [o.name for o in m.graph.output]
    assert io(dense) == io(sparse)


def test_graph_contract(lowered):
    import onnx

    art = lowered("relu", "predictor")
    m = onnx.load(str(art.outdir / "model.onnx"))
    onnx.checker.check_model(m)
    assert m.ir_version == 10
    L = art.ir.config.num_layers
    names = [i.name for i in m.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{k}" for i in range(L) for k in ("key", "value")]
    assert [o.name for o in m.graph.output] == ["logits"] + [
        f"present.{i}.{k}" for i in range(L) for k in ("key", "value")
    ]
    dims = [d.dim_param for d in m.graph.input[3].type.tensor_type.shape.dim]
    assert dims[0] == "batch_size" and dims[2] == "past_sequence_length"
    ifs = [n for n in m.graph.node if n.op_type == "If"]
    assert [n.name for n in ifs] == [f"/model/layers.{i}/mlp/If" for i in range(L)]
    decode = next(n for n in ifs[0].attribute if n.name == "else_branch").g.node
    (ffn,) = [n for n in decode if n.op_type == "SparseFFN"]
    assert ffn.domain == "ai.tscompile" and ffn.name == "/model/layers.0/mlp/SparseFFN/SparseFFN"
    assert ffn.input[0].startswith("/model/layers.0/post_attention_layernorm/")
    assert list(ffn.input[1:]) == [
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight_t",
        "model.layers.0.mlp.predictor.fc1.weight",
        "model.layers.0.mlp.predictor.fc2.weight",
    ]
    (fn,) = m.functions
    assert (fn.domain, fn.name, fn.overload) == ("ai.tscompile", "SparseFFN", "relu_predictor")
    assert {"NonZero", "Gather", "MatMul"} <= {n.op_type for n in fn.node}
    # weight layout for the sparse path: rows of [inter, hidden]
    shapes = {t.name: list(t.dims) for t in m.graph.initializer}
    H, I = art.ir.config.hidden_size, art.ir.config.intermediate_size
    for w in ("gate_proj.weight", "up_proj.weight", "down_proj.weight_t"):
        assert shapes[f"model.layers.0.mlp.{w}"] == [I, H]


def _profiled_ops(runner) -> list[tuple[str, str]]:
    runner.logits(PROMPT, FORCED[:3])
    with open(runner.end_profiling()) as f:
        events = json.load(f)
    return [(e["args"].get("op_name", ""), e["name"]) for e in events if e.get("cat") == "Node"]


def _counters(art):
    lib = ctypes.CDLL(str(art.outdir / "libtscompile_ort.so"))  # the same handle ORT dlopen()ed
    for f in (
        lib.tscompile_sparse_ffn_calls,
        lib.tscompile_sparse_ffn_tokens,
        lib.tscompile_sparse_ffn_active_rows,
    ):
        f.restype = ctypes.c_uint64
    return lambda: (
        lib.tscompile_sparse_ffn_calls(),
        lib.tscompile_sparse_ffn_tokens(),
        lib.tscompile_sparse_ffn_active_rows(),
    )


def test_function_body_runs_without_the_library(lowered, tmp_path):
    from tscompile.backends.onnx import BACKEND

    art = lowered("swiglu", "predictor")
    counters = _counters(art)
    before = counters()
    ops = _profiled_ops(BACKEND.load(art.outdir, native=False, profile_prefix=str(tmp_path / "body")))
    assert counters() == before
    kinds = {op for op, _ in ops}
    assert "SparseFFN" not in kinds
    assert {"NonZero", "Gather"} <= kinds  # the inlined function body ran
    assert any("SparseFFN" in name and op == "NonZero" for op, name in ops)


def test_native_library_runs_when_registered(lowered, tmp_path):
    from tscompile.backends.onnx import BACKEND

    art = lowered("swiglu", "predictor")
    counters = _counters(art)
    calls0, tokens0, rows0 = counters()
    ops = _profiled_ops(BACKEND.load(art.outdir, profile_prefix=str(tmp_path / "native")))
    calls, tokens, rows = counters()
    L, I = art.ir.config.num_layers, art.ir.config.intermediate_size
    assert calls - calls0 == 3 * L and tokens - tokens0 == 3 * L  # 3 decode steps, one call per layer
    gated = 1 - (rows - rows0) / (3 * L * I)
    assert 0.4 < gated < 0.9  # the predictor gates ~65% of neurons
    kinds = {op for op, _ in ops}
    assert "SparseFFN" in kinds and "NonZero" not in kinds


def test_float16_weights(lowered):
    import torch
    from tscompile.backends.onnx import BACKEND

    from tscompile.ir import ffn_names

    art = lowered("drelu", "predictor", "float16")
    rounded = art.ir.clone()  # the reference with the FFN weights rounded as stored
    for layer, expert, _ in rounded.ffn_units():
        for n in ffn_names(layer, expert):
            rounded.weights[n] = rounded.weights[n].to(torch.float16).float()
    want = reference_logits(rounded)
    for native in (False, True):
        assert rel_l2(BACKEND.load(art.outdir, native=native).logits(PROMPT, FORCED), want) <= 1e-4


def test_a_weight_beyond_float16_is_refused_naming_it(tmp_path):
    """It became inf in the float16 weights, and the outputs NaN, with nothing said at lowering."""
    from onnx_tiny import sparsify
    from tscompile.backends.onnx import BACKEND, OnnxConfig

    from tscompile.api import Context
    from tscompile.errors import UserError
    from tscompile.tiny import make_tiny_ir

    ir = sparsify(make_tiny_ir("mistral", "drelu", seed=3), "exact")
    ir.weights["model.layers.1.mlp.up_proj.weight"][3, 5] = -1e5
    ctx = Context(spec=None, build_dir=tmp_path, work_dir=tmp_path)
    with pytest.raises(UserError, match=r"^onnx: tensor model\.layers\.1\.mlp\.up_proj\.weight holds 100000, "
                                        r"beyond float16's range \(65504\); use dtype float32 for this target$"):
        BACKEND.lower(ir, OnnxConfig(dtype="float16"), tmp_path, ctx)


def test_batched_decode_masks_each_token(lowered):
    """Two sequences in one call: the union of active rows is gathered and each token keeps its own gate."""
    import onnxruntime as ort
    import torch

    from tscompile.reference import KVCache, ReferenceModel

    art = lowered("geglu", "predictor")
    cfg = art.ir.config
    prompts = [PROMPT[:8], FORCED[:8]]
    nxt = [[5], [9]]
    ref = ReferenceModel.from_ir(art.ir)
    cache = KVCache.empty(cfg.num_layers)
    with torch.no_grad():
        ref(torch.tensor(prompts), cache=cache)
        want = ref(torch.tensor(nxt), cache=cache)[:, -1].numpy()
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(art.outdir / "libtscompile_ort.so"))
    for options in (ort.SessionOptions(), so):
        sess = ort.InferenceSession(str(art.outdir / "model.onnx"), options)
        outs = [o.name for o in sess.get_outputs()]
        empty = np.zeros((2, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
        feed = {f"past_key_values.{i}.{k}": empty for i in range(cfg.num_layers) for k in ("key", "value")}
        res = sess.run(
            outs,
            {
                "input_ids": np.array(prompts),
                "attention_mask": np.ones((2, 8), np.int64),
                "position_ids": np.tile(np.arange(8), (2, 1)),
                **feed,
            },
        )
        feed = {n.replace("present.", "past_key_values."): v for n, v in zip(outs[1:], res[1:])}
        got = sess.run(
            ["logits"],
            {
                "input_ids": np.array(nxt),
                "attention_mask": np.ones((2, 9), np.int64),
                "position_ids": np.full((2, 1), 8),
                **feed,
            },
        )[0][:, -1]
        assert rel_l2(got, want) <= 1e-4


def test_without_headers_warns_once_and_runs_the_function_body(tmp_path, monkeypatch):
    from onnx_tiny import sparsify
    from tscompile.backends.onnx import BACKEND, OnnxConfig, native

    from tscompile.tiny import make_tiny_ir

    monkeypatch.setenv("TSCOMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ORT_INCLUDE_DIR", raising=False)
    monkeypatch.setenv("CXX", shutil.which("g++") or "g++")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no npm to fetch headers with
    monkeypatch.setattr(native, "_warned", False)
    ir = sparsify(make_tiny_ir("llama", "relu", seed=5), "exact")
    with pytest.warns(UserWarning, match=r"native SparseFFN kernels not built \(npm is not installed"):
        manifest = BACKEND.lower(ir, OnnxConfig(), tmp_path / "a", None)
    assert manifest["native_library"] is None and not (tmp_path / "a" / "libtscompile_ort.so").exists()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not again
        BACKEND.lower(ir, OnnxConfig(), tmp_path / "b", None)
    runner = BACKEND.load(tmp_path / "a")
    assert not runner.native
    assert rel_l2(runner.logits(PROMPT, FORCED[:4]), reference_logits(ir, PROMPT, FORCED[:4])) <= 1e-4


def test_bad_input_is_a_user_error(tmp_path):
    from tscompile.backends.onnx import BACKEND, OnnxConfig

    from tscompile.errors import UserError
    from tscompile.tiny import make_tiny_ir

    ir = make_tiny_ir("llama", "relu", seed=5)
    ir.layers[1].mode = "predictor"
    with pytest.raises(UserError, match=r"layers\[1\]: mode 'predictor' but the FFN has no predictor"):
        BACKEND.lower(ir, OnnxConfig(native=False), tmp_path / "a", None)
    with pytest.raises(UserError, match="not found"):
        BACKEND.load(tmp_path / "nothing")


def test_large_models_keep_weights_in_external_data(tmp_path, monkeypatch):
    from onnx_tiny import sparsify
    from tscompile.backends.onnx import BACKEND, OnnxConfig, lower

    from tscompile.tiny import make_tiny_ir

    monkeypatch.setattr(lower, "EXTERNAL_BYTES", 0)          # as if the model were over 1.5 GB
    ir = sparsify(make_tiny_ir("qwen2", "drelu", seed=6), "predictor")
    manifest = BACKEND.lower(ir, OnnxConfig(native=False), tmp_path, None)
    assert manifest["external_data"]
    for d in (tmp_path, tmp_path / "dense"):
        assert (d / "model.onnx").stat().st_size < 100_000 < (d / "model.onnx.data").stat().st_size
    runner = BACKEND.load(tmp_path)
    assert rel_l2(runner.logits(PROMPT, FORCED[:4]), reference_logits(ir, PROMPT, FORCED[:4])) <= 1e-4
