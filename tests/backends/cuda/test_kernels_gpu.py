"""The generated kernels against a float64 reference on the GPU: every activation kind, batches 1-8, fresh random
inputs and active sets each run, outputs poisoned first. Skipped without a CUDA GPU."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import torch.nn.functional as F  # noqa: E402

from tscompile.backends.cuda.kernels import BATCHES, KernelShape, compile_library, render_source  # noqa: E402
from tscompile.backends.cuda.library import KernelLibrary, Workspace, default_grid  # noqa: E402
from tscompile.reference import activate  # noqa: E402

KINDS = ("swiglu", "geglu", "relu", "drelu")
SHAPES = {"smollm2": (576, 1536), "odd": (200, 999)}   # odd: hidden not a multiple of 256, inter not of 32
RANK = 64


@pytest.fixture(scope="module", params=[(s, d) for s in SHAPES for d in ("bfloat16", "float16")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def lib(request, tmp_path_factory):
    name, dtype = request.param
    hidden, inter = SHAPES[name]
    major, minor = torch.cuda.get_device_capability()
    src = render_source(KernelShape(name, hidden, inter, dtype, KINDS, RANK))
    lib = KernelLibrary(compile_library(src, f"sm_{major}{minor}", tmp_path_factory.mktemp(name)))
    return lib, getattr(torch, dtype)


def rel_err(got, want) -> float:
    got = got.double()
    assert torch.isfinite(got).all(), "unwritten (poisoned) or non-finite outputs"
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", BATCHES)
def test_sparse_ffn_matches_reference(lib, kind, batch):
    lib, dtype = lib
    H, I = lib.hidden, lib.inter
    ws = Workspace(lib, RANK, lib.max_batch)
    for trial in range(3):   # fresh weights, inputs, active sets, thresholds, grids each time
        gen = torch.Generator(device="cuda").manual_seed(100 * batch + trial)
        w = [torch.randn(I, H, device="cuda", generator=gen).to(dtype) / H ** 0.5 for _ in range(3)]
        x = torch.randn(batch, H, device="cuda", generator=gen).to(dtype)
        n = int(torch.randint(0, I + 1, (1,), generator=gen, device="cuda")) if trial else I // 10
        ids = torch.randperm(I, device="cuda", generator=gen)[:n]
        active = torch.zeros(I, dtype=torch.int32, device="cuda")
        active[:n] = ids.int()
        count = torch.tensor([n], dtype=torch.int32, device="cuda")
        mask = torch.rand(batch, I, device="cuda", generator=gen) < 0.7 if batch > 1 else None
        threshold = [0.0, 0.01, 0.05][trial]
        grid = [default_grid(), 7, 1][trial]
        y = torch.full((batch, H), float("nan"), device="cuda", dtype=dtype)
        residual = torch.randn(batch, H, device="cuda", generator=gen).to(dtype) if trial == 1 else None
        lib.sparse_ffn(x, *w, kind, threshold, active, count, None if mask is None else mask.to(torch.uint8),
                       ws, y, grid, residual)
        torch.cuda.synchronize()
        xd = x.double()
        h = activate(kind, xd @ w[0].double().T, xd @ w[1].double().T)
        keep = torch.zeros(batch, I, dtype=torch.bool, device="cuda")
        keep[:, ids] = True
        if mask is not None:
            keep &= mask
        h = h * keep * (h.abs() > threshold)
        want = h @ w[2].double()
        if residual is not None:
            want = want + residual.double()
        if n == 0 or want.norm() == 0:
            assert (y == 0).all()
        else:
            assert rel_err(y, want) <= 1e-2, (kind, batch, trial, n)
        assert int(ws.blocks_done.item()) == 0 and float(ws.acc.abs().max()) == 0.0, "workspace left dirty"


@pytest.mark.parametrize("batch", BATCHES)
def test_predictor_selects_the_reference_set(lib, batch):
    lib, dtype = lib
    H, I = lib.hidden, lib.inter
    ws = Workspace(lib, RANK, lib.max_batch)
    for trial, (rank, relu) in enumerate([(RANK, True), (24, False), (8, True)]):
        gen = torch.Generator(device="cuda").manual_seed(7 * batch + trial)
        fc1 = (torch.randn(rank, H, device="cuda", generator=gen) / H ** 0.5).to(dtype)
        fc2 = (torch.randn(I, rank, device="cuda", generator=gen) / rank ** 0.5).to(dtype)
        x = torch.randn(batch, H, device="cuda", generator=gen).to(dtype)
        z = x.double() @ fc1.double().T
        logits = (F.relu(z) if relu else z) @ fc2.double().T
        thr = float(logits.float().quantile(0.8))
        ws.active.fill_(-1)
        ws.active_count.fill_(12345)   # predict_hidden must reset it
        lib.predict(x, fc1, fc2, relu, thr, ws)
        torch.cuda.synchronize()
        n = int(ws.active_count.item())
        got = ws.active[:n].long()
        assert got.unique().numel() == n and (got >= 0).all() and (got < I).all()
        keep = logits >= thr
        near = (logits - thr).abs() <= 1e-2 * logits.abs().max()   # bf16 rounding may flip these
        got_mask = torch.zeros(I, dtype=torch.bool, device="cuda")
        got_mask[got] = True
        assert ((got_mask != keep.any(0)) <= near.any(0)).all()
        if batch > 1:
            tm = ws.token_mask[:batch].bool()
            assert ((tm != keep) <= near).all()
