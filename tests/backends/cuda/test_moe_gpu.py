"""The generated MoE kernels and the dense (cuBLAS) MoE step against a float64 reference on the GPU: fresh random
weights, inputs, routing, per-expert thresholds and active sets each trial, outputs poisoned first; both paths also
replayed from a CUDA graph with new inputs (the routing never leaves the GPU). Skipped without a CUDA GPU.
Whole tiny Mixtral models run in test_runtime_gpu.py (greedy tokens vs the reference)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import torch.nn.functional as F  # noqa: E402
from tscompile.backends.cuda.kernels import compile_library, device_arch  # noqa: E402
from tscompile.backends.cuda.library import KernelLibrary, default_grid  # noqa: E402
from tscompile.backends.cuda.model import FFNSpec  # noqa: E402
from tscompile.backends.cuda.moe import (MoEKernels, MoELayer, MoEShape, MoEWorkspace, expert_params,  # noqa: E402
                                         render_moe_source)
from tscompile.reference import activate  # noqa: E402

KINDS = ("swiglu", "drelu")
SHAPES = {"small": (1024, 2816, 8, 2), "odd": (200, 999, 5, 3)}   # hidden, inter, experts, top_k
RANK = 64


@pytest.fixture(scope="module", params=[("small", "bfloat16"), ("odd", "bfloat16"), ("odd", "float16")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def moe(request, tmp_path_factory):
    name, dtype = request.param
    H, I, E, K = SHAPES[name]
    src = render_moe_source(MoEShape(name, H, I, E, K, dtype, KINDS, RANK))
    lib = KernelLibrary(compile_library(src, device_arch(), tmp_path_factory.mktemp(name)))
    return MoEKernels(lib), getattr(torch, dtype)


def random_layer(kernels, dtype, gen, predictors: bool):
    """Weights of one MoE layer in the runtime's layout, per-expert specs (random thresholds, predictors on a random
    subset of experts when asked), and a predictor threshold per expert near its 80th percentile."""
    lib, E = kernels.lib, kernels.experts
    H, I = lib.hidden, lib.inter

    def randn(*shape, scale):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype)
    w = {"layers.0.router": randn(E, H, scale=H ** -0.5), "layers.0.gate": randn(E * I, H, scale=H ** -0.5),
         "layers.0.up": randn(E * I, H, scale=H ** -0.5), "layers.0.down_t": randn(E * I, H, scale=I ** -0.5)}
    gated = (torch.rand(E, generator=gen, device="cuda") < 0.6).tolist() if predictors else [False] * E
    if predictors:
        w["layers.0.fc1"] = randn(E * RANK, H, scale=H ** -0.5)
        w["layers.0.fc2"] = randn(E * I, RANK, scale=RANK ** -0.5)
    specs = [FFNSpec("swiglu", float([0.0, 0.01, 0.03][int(torch.randint(3, (1,), generator=gen, device="cuda"))]),
                     "predictor" if g else "exact", 0.0, bool(e % 2 == 0)) for e, g in enumerate(gated)]
    return w, specs


def moe_reference(x, w, specs, kind, logits, top_k, lists=None, counts=None):
    """float64 y [1, H] of the MoE layer routed by `logits` (the path's own, so that a last-bit difference at a
    near-tie cannot make the two pick different experts; equal logits go to the lower expert, as in the kernel); each
    expert over its listed neurons where it has a predictor, else all. Returns (y, routed experts)."""
    I = w["layers.0.gate"].shape[0] // len(specs)
    top, experts = logits.double().sort(descending=True, stable=True)
    top, experts = top[:top_k], experts[:top_k]
    weights = (top - top[0]).exp()
    weights = weights / weights.sum()
    xd, y = x.double(), torch.zeros_like(x, dtype=torch.float64)
    for wk, e in zip(weights.tolist(), experts.tolist()):
        ids = torch.arange(I, device="cuda")
        if specs[e].gated:
            ids = lists[e, : int(counts[e])].long()
        rows = e * I + ids
        h = activate(kind, xd @ w["layers.0.gate"][rows].double().T, xd @ w["layers.0.up"][rows].double().T)
        h = h * (h.abs() > specs[e].threshold)
        y += wk * (h @ w["layers.0.down_t"][rows].double())
    return y, experts


def rel_err(got, want) -> float:
    got = got.double()
    assert torch.isfinite(got).all(), "unwritten (poisoned) or non-finite outputs"
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("kind", KINDS)
def test_moe_kernels_match_reference(moe, kind):
    """Router + grouped experts over given active lists (experts without a predictor use every neuron)."""
    kernels, dtype = moe
    lib, E, K = kernels.lib, kernels.experts, kernels.top_k
    H, I = lib.hidden, lib.inter
    ws = MoEWorkspace(kernels, RANK)
    for trial in range(3):   # fresh weights, inputs, routing, lists, thresholds, grids, residual each time
        gen = torch.Generator(device="cuda").manual_seed(31 * trial + len(kind))
        w, specs = random_layer(kernels, dtype, gen, predictors=False)
        listed = [trial > 0 and e % 2 == trial % 2 for e in range(E)]   # trial 0: every expert dense
        specs = [FFNSpec(kind, s.threshold, "predictor" if g else "exact") for s, g in zip(specs, listed)]
        lists = torch.stack([torch.randperm(I, device="cuda", generator=gen).int() for _ in range(E)])
        counts = torch.randint(0, I + 1, (E,), device="cuda", generator=gen).int()
        x = torch.randn(1, H, device="cuda", generator=gen).to(dtype)
        residual = torch.randn(1, H, device="cuda", generator=gen).to(dtype) if trial == 1 else None
        y = torch.full((1, H), float("nan"), device="cuda", dtype=dtype)
        params = expert_params(specs, "cuda")
        kernels.route(x, w["layers.0.router"], ws)
        kernels.experts_ffn(x, w["layers.0.gate"], w["layers.0.up"], w["layers.0.down_t"], kind, params, ws, y,
                            [default_grid(), 7, 1][trial], residual=residual, lists=lists, counts=counts)
        torch.cuda.synchronize()
        want_logits = (x.double() @ w["layers.0.router"].double().T)[0]
        torch.testing.assert_close(ws.logits.double(), want_logits, rtol=1e-2, atol=1e-2 * want_logits.abs().max())
        want, _ = moe_reference(x, w, specs, kind, ws.logits, K, lists, counts)
        if residual is not None:
            want = want + residual.double()
        assert rel_err(y, want) <= 1e-2, (kind, trial)


def test_moe_predictors_select_the_reference_sets(moe):
    """Each routed expert with a predictor lists exactly the neurons its predictor keeps (up to rounding at the
    threshold); the grouped kernel then computes the layer over those lists."""
    kernels, dtype = moe
    lib, E, K = kernels.lib, kernels.experts, kernels.top_k
    H, I = lib.hidden, lib.inter
    ws = MoEWorkspace(kernels, RANK)
    for trial in range(3):
        gen = torch.Generator(device="cuda").manual_seed(5 + trial)
        w, specs = random_layer(kernels, dtype, gen, predictors=True)
        x = torch.randn(1, H, device="cuda", generator=gen).to(dtype)
        fc1 = w["layers.0.fc1"].double().view(E, RANK, H)
        fc2 = w["layers.0.fc2"].double().view(E, I, RANK)
        z = torch.einsum("erh,h->er", fc1, x.double()[0])
        relu = torch.tensor([s.predictor_relu for s in specs], device="cuda")
        z = torch.where(relu[:, None], F.relu(z), z)
        logits = torch.einsum("eir,er->ei", fc2, z)
        thr = logits.float().quantile(0.8, dim=1)
        specs = [FFNSpec("swiglu", s.threshold, s.mode, float(thr[e]), s.predictor_relu) for e, s in enumerate(specs)]
        params = expert_params(specs, "cuda")
        ws.lists.fill_(-1)
        ws.counts.fill_(12345)   # moe_predict_hidden must reset the routed experts' counts
        y = torch.full((1, H), float("nan"), device="cuda", dtype=dtype)
        kernels.route(x, w["layers.0.router"], ws)
        kernels.predict(x, w["layers.0.fc1"], w["layers.0.fc2"], params, ws)
        kernels.experts_ffn(x, w["layers.0.gate"], w["layers.0.up"], w["layers.0.down_t"], "swiglu", params, ws, y,
                            default_grid())
        torch.cuda.synchronize()
        want, routed = moe_reference(x, w, specs, "swiglu", ws.logits, K, ws.lists, ws.counts)
        assert rel_err(y, want) <= 1e-2, trial
        for e in routed.tolist():
            if not specs[e].gated:
                continue
            n = int(ws.counts[e])
            got = ws.lists[e, :n].long()
            assert got.unique().numel() == n and (got >= 0).all() and (got < I).all()
            got_mask = torch.zeros(I, dtype=torch.bool, device="cuda")
            got_mask[got] = True
            keep = logits[e] >= thr[e]
            near = (logits[e] - thr[e]).abs() <= 1e-2 * logits[e].abs().max()   # rounding may flip these
            assert ((got_mask != keep) <= near).all(), (trial, e)


def test_decode_steps_replay_from_a_cuda_graph(moe):
    """MoELayer.decode_into, sparse (generated kernels) and dense (cuBLAS batched GEMMs, pointers from the routing),
    captured once and replayed on new inputs: each replay routes afresh on the GPU and matches the reference."""
    kernels, dtype = moe
    lib, K = kernels.lib, kernels.top_k
    H, I = lib.hidden, lib.inter
    gen = torch.Generator(device="cuda").manual_seed(11)
    w, specs = random_layer(kernels, dtype, gen, predictors=False)
    cfg = SimpleNamespace(hidden_size=H, intermediate_size=I, num_experts_per_tok=K)
    spec = FFNSpec("swiglu", 0.0, experts=specs)
    sparse = MoELayer(cfg, spec, w, 0, kernels, MoEWorkspace(kernels, RANK), default_grid())
    dense = MoELayer(cfg, spec, w, 0)
    hn, x = torch.zeros(1, H, device="cuda", dtype=dtype), torch.zeros(1, H, device="cuda", dtype=dtype)
    out = {}
    for name, layer in (("sparse", sparse), ("dense", dense)):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer.decode_into(hn, x.clone())   # warm-up outside the graph (cuBLAS, allocator)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out[name] = layer.decode_into(hn, x)
        out[name, "graph"] = g
    seen = set()
    for trial in range(4):
        hn.copy_(torch.randn(1, H, device="cuda", generator=gen).to(dtype))
        base = (0.1 * torch.randn(1, H, device="cuda", generator=gen)).to(dtype)
        for name in ("sparse", "dense"):
            x.copy_(base)
            out[name, "graph"].replay()
            torch.cuda.synchronize()
            logits = sparse.ws.logits if name == "sparse" else F.linear(hn, w["layers.0.router"]).float()[0]
            want, routed = moe_reference(hn, w, specs, "swiglu", logits, K)
            seen.add(tuple(sorted(routed.tolist())))
            assert rel_err(out[name] - base, want) <= 2e-2, (name, trial)
    assert len(seen) > 1, "the inputs never changed the routing: the test would not see a stale one"
