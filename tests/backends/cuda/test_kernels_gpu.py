"""The generated kernels against a float64 reference on the GPU: every activation kind, batches 1-8, fresh random
inputs and active sets each run, outputs poisoned first; the decode-step GEMV and attention kernels likewise.
Skipped without a CUDA GPU."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import torch.nn.functional as F  # noqa: E402

from tscompile.backends.cuda.kernels import BATCHES, KernelShape, compile_library, device_arch, render_source  # noqa: E402
from tscompile.backends.cuda.library import KernelLibrary, Workspace, default_grid  # noqa: E402
from tscompile.backends.cuda.model import fold_predictor  # noqa: E402
from tscompile.reference import activate  # noqa: E402

KINDS = ("swiglu", "geglu", "relu", "drelu")
# hidden, inter, heads, kv_heads, head_dim; odd: hidden not a multiple of 256, inter not of 32, heads * head_dim
# (192) != hidden; gqa128: Mistral-7B's attention (32 query heads on 8 KV heads of 128) on a small FFN; group8: 8
# query heads per KV head, the 128-thread attention block (256 threads up to 4)
SHAPES = {"smollm2": (576, 1536, 9, 3, 64), "odd": (200, 999, 6, 2, 32), "gqa128": (512, 1024, 32, 8, 128),
          "group8": (256, 512, 16, 2, 64)}
RANK = 64
EPS = 1e-5


@pytest.fixture(scope="module", params=[(s, d) for s in SHAPES for d in ("bfloat16", "float16")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def lib(request, tmp_path_factory):
    name, dtype = request.param
    hidden, inter, heads, kv_heads, head_dim = SHAPES[name]
    src = render_source(KernelShape(name, hidden, inter, dtype, KINDS, RANK, heads=heads, kv_heads=kv_heads,
                                    head_dim=head_dim))
    lib = KernelLibrary(compile_library(src, device_arch(), tmp_path_factory.mktemp(name)))
    return lib, getattr(torch, dtype)


def rms_normed(x, w):
    """float64 RMSNorm of x [B, H] with weight w [H]."""
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + EPS) * w.double()


def sign_bits(v):
    """int16 [ceil(n / 16)]: bit r % 16 of word r / 16 set where v[r] > 0 (what gemv writes to `positive`)."""
    b = (v.flatten() > 0).long()
    b = torch.cat([b, b.new_zeros(-b.numel() % 16)]).view(-1, 16)
    return (b << torch.arange(16, device=b.device)).sum(1).to(torch.int32).to(torch.int16)


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
        norm = (1 + 0.2 * torch.randn(H, device="cuda", generator=gen)).to(dtype) if trial == 2 else None
        lib.sparse_ffn(x, *w, kind, threshold, active, count, None if mask is None else mask.to(torch.uint8),
                       ws, y, grid, residual, norm=norm, eps=EPS)
        torch.cuda.synchronize()
        xd = x.double() if norm is None else rms_normed(x, norm)
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
        assert int(ws.barrier.item()) & 0x7FFFFFFF == 0, "grid barrier counter left mid-count"


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_ffn_exact_matches_reference(lib, kind):
    """Exact gating. relu, drelu: the neurons whose sign bit is set (g shifted so that 100% / 50% / 15% / 30% are
    listed; the kernel takes g from the given values, never from the gate rows); swiglu, geglu: every neuron. h
    thresholded, down rows of zero h skipped (their h must not leak in either way)."""
    lib, dtype = lib
    H, I = lib.hidden, lib.inter
    ws = Workspace(lib, RANK, 1)
    gate_lists = kind in ("relu", "drelu")
    for trial in range(4):
        gen = torch.Generator(device="cuda").manual_seed(31 + trial)
        w = [torch.randn(I, H, device="cuda", generator=gen).to(dtype) / H ** 0.5 for _ in range(3)]
        x = torch.randn(1, H, device="cuda", generator=gen).to(dtype)
        norm = (1 + 0.2 * torch.randn(H, device="cuda", generator=gen)).to(dtype) if trial % 2 else None
        xd = x.double() if norm is None else rms_normed(x, norm)
        g = xd @ w[0].double().T
        gate_values = (g - g.quantile([0.0, 0.5, 0.85, 0.7][trial]) + 1e-6).float() if gate_lists else None
        threshold = [0.0, 0.01, 0.05, 0.02][trial]
        grid = [default_grid(), 7, 1, default_grid()][trial]
        residual = torch.randn(1, H, device="cuda", generator=gen).to(dtype) if trial == 1 else None
        y = torch.full((1, H), float("nan"), device="cuda", dtype=dtype)
        gate = None if gate_values is None else (gate_values, sign_bits(gate_values))
        lib.sparse_ffn_exact(x, *w, kind, threshold, gate, ws, y, grid, residual, norm=norm, eps=EPS)
        torch.cuda.synchronize()
        h = activate(kind, g if gate_values is None else gate_values.double(), xd @ w[1].double().T)
        h = h * (h.abs() > threshold)
        want = h @ w[2].double() + (0 if residual is None else residual.double())
        assert rel_err(y, want) <= 1e-2, (kind, trial)
        assert int(ws.barrier.item()) & 0x7FFFFFFF == 0, "grid barrier counter left mid-count"


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
        norm = (1 + 0.2 * torch.randn(H, device="cuda", generator=gen)).to(dtype) if trial == 1 else None
        z = (x.double() if norm is None else rms_normed(x, norm)) @ fc1.double().T
        logits = (F.relu(z) if relu else z) @ fc2.double().T
        thr = float(logits.float().quantile(0.8))
        ws.active.fill_(-1)
        ws.active_count.fill_(12345)   # predict_hidden must reset it
        lib.predict(x, fc1, fc2, relu, thr, ws, norm=norm, eps=EPS)
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


def test_predictor_folded_into_o_proj_selects_the_reference_set(lib):
    """A decode step's predictor with its first layer folded into the o_proj GEMV (fold_predictor): o_proj with the
    extra rows, then predict_folded, pick the set the float64 predictor picks on rmsnorm(x_in + W_o att); the
    GEMV's own output is untouched by them and it resets the active count. Extra rows need o_proj's rows in whole
    blocks of 16: refused otherwise."""
    lib, dtype = lib
    H, I, A = lib.hidden, lib.inter, lib.heads * lib.head_dim
    ws = Workspace(lib, RANK, lib.max_batch)
    if H % 16:
        y = torch.zeros(1, A, device="cuda", dtype=dtype)
        with pytest.raises(RuntimeError, match="gemv"):
            lib.gemv(y, torch.zeros(H, A, device="cuda", dtype=dtype), torch.zeros(1, H, device="cuda", dtype=dtype),
                     extra=(y, y, y, ws.z))
        return
    if A != H:
        pytest.skip("the fold needs heads * head_dim == hidden (x_in is o_proj's second input)")
    for trial, (rank, relu) in enumerate([(RANK, True), (24, False)]):
        gen = torch.Generator(device="cuda").manual_seed(11 + trial)

        def rnd(*shape, scale=1.0, gen=gen):
            return (scale * torch.randn(*shape, device="cuda", generator=gen)).to(dtype)
        fc1, fc2 = rnd(rank, H, scale=H ** -0.5), rnd(I, rank, scale=rank ** -0.5)
        w_o, w_post = rnd(H, A, scale=A ** -0.5), (1 + 0.2 * torch.randn(H, device="cuda", generator=gen)).to(dtype)
        x_in, att = rnd(1, H), rnd(1, A)
        rows_att, rows_in = fold_predictor(fc1, w_post, w_o)
        mid = torch.full((1, H), float("nan"), device="cuda", dtype=dtype)
        ws.z.fill_(float("nan"))
        ws.active_count.fill_(12345)
        lib.gemv(att, w_o, mid, residual=x_in, extra=(rows_att, rows_in, x_in, ws.z), zero=ws.active_count)
        torch.cuda.synchronize()
        assert int(ws.active_count.item()) == 0
        assert rel_err(mid, x_in.double() + att.double() @ w_o.double().T) <= 1e-2
        want_z = att[0].double() @ rows_att.double().T + x_in[0].double() @ rows_in.double().T
        assert rel_err(ws.z[0, :rank], want_z) <= 1e-2
        assert ws.z[0, rank:].isnan().all(), "rows past the extra ones written"
        z = rms_normed(mid, w_post) @ fc1.double().T
        logits = ((F.relu(z) if relu else z) @ fc2.double().T)[0]
        thr = float(logits.float().quantile(0.8))
        lib.predict_folded(mid, fc2, relu, thr, ws, EPS)
        torch.cuda.synchronize()
        n = int(ws.active_count.item())
        got = ws.active[:n].long()
        assert got.unique().numel() == n and (got >= 0).all() and (got < I).all()
        near = (logits - thr).abs() <= 2e-2 * logits.abs().max()   # the bf16 rows may flip these
        got_mask = torch.zeros(I, dtype=torch.bool, device="cuda")
        got_mask[got] = True
        assert ((got_mask != (logits >= thr)) <= near).all() and near.float().mean() < 0.2, trial


@pytest.mark.parametrize("kind", (None,) + KINDS)
def test_gemv_matches_reference(lib, kind):
    """Every GEMV the decode step uses: q/k/v (norm + bias), o_proj (K = heads * head_dim, residual aliasing the
    output), LM head (fp32 out), dense gate/up with each activation and a threshold; the sign bits of y (exact
    gating's gate GEMV) where asked for."""
    lib, dtype = lib
    H, I = lib.hidden, lib.inter
    cases = [dict(k=H, n=(lib.heads + 2 * lib.kv_heads) * lib.head_dim, norm=True, bias=True),
             dict(k=lib.heads * lib.head_dim, n=H, residual=True),
             dict(k=H, n=1000, norm=True, out=torch.float32)] if kind is None else \
        [dict(k=H, n=I, norm=True, threshold=0.0), dict(k=H, n=I, norm=False, threshold=0.02)]
    for t, case in enumerate(cases):
        gen = torch.Generator(device="cuda").manual_seed(31 * t + len(kind or ""))
        k, n = case["k"], case["n"]
        w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).to(dtype)
        up = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).to(dtype) if kind else None
        x = torch.randn(1, k, device="cuda", generator=gen).to(dtype)
        norm = (1 + 0.2 * torch.randn(k, device="cuda", generator=gen)).to(dtype) if case.get("norm") else None
        bias = torch.randn(n, device="cuda", generator=gen).to(dtype) if case.get("bias") else None
        xd = x.double() if norm is None else rms_normed(x, norm)
        want = xd @ w.double().T
        if kind:
            want = activate(kind, want, xd @ up.double().T)
            want = want * (want.abs() > case["threshold"])
        if bias is not None:
            want = want + bias.double()
        if case.get("residual"):
            y = torch.randn(1, n, device="cuda", generator=gen).to(dtype)
            want = want + y.double()
            lib.gemv(x, w, y, residual=y)
        else:
            y = torch.full((1, n), float("nan"), device="cuda", dtype=case.get("out", dtype))
            positive = None if kind else torch.full((-(-n // 16),), -1, device="cuda", dtype=torch.int16)
            lib.gemv(x, w, y, norm=norm, eps=EPS, bias=bias, up=up, activation=kind,
                     threshold=case.get("threshold", 0.0), positive=positive)
            torch.cuda.synchronize()
            if positive is not None:
                assert torch.equal(positive, sign_bits(y)), case
        torch.cuda.synchronize()
        assert rel_err(y, want) <= 1e-2, (kind, case)


def attention_reference(qkv, pos, cos, sin, k_cache, v_cache, heads, kv_heads, window):
    """float64 out [heads * hd] of one token at pos, and its roped k (rounded to the cache dtype) and v."""
    hd = k_cache.shape[-1]
    q = qkv[:heads * hd].view(heads, hd).double()
    k = qkv[heads * hd:(heads + kv_heads) * hd].view(kv_heads, hd).double()
    v = qkv[(heads + kv_heads) * hd:].view(kv_heads, hd)

    def rope(t):
        return t * cos[pos].double() + t.roll(hd // 2, dims=-1) * sin[pos].double()
    k_new = rope(k).to(k_cache.dtype)
    keys, values = k_cache.clone(), v_cache.clone()
    keys[:, pos], values[:, pos] = k_new, v
    lo = max(0, pos - window + 1) if window else 0
    kk = keys[:, lo:pos + 1].double().repeat_interleave(heads // kv_heads, 0)      # [heads, S, hd]
    vv = values[:, lo:pos + 1].double().repeat_interleave(heads // kv_heads, 0)
    p = torch.softmax((rope(q)[:, None] * kk).sum(-1) / hd ** 0.5, dim=-1)         # [heads, S]
    return (p[..., None] * vv).sum(1).flatten(), k_new, v


@pytest.mark.parametrize("capacity,window", [(96, 0), (700, 0), (300, 40), (64, 5), (2100, 0), (1500, 700)])
def test_decode_attention_matches_reference(lib, capacity, window):
    """Fresh caches and positions each run (first, last, across chunk boundaries; 2100 and 1500 positions are more
    chunks than a KV head has blocks, so blocks walk several); the new k, v land in the cache at pos and nowhere
    else."""
    lib, dtype = lib
    hd, nh, nkv = lib.head_dim, lib.heads, lib.kv_heads
    ang = torch.arange(capacity, device="cuda", dtype=torch.float64)[:, None] / \
        (1e4 ** (torch.arange(0, hd, 2, device="cuda", dtype=torch.float64) / hd))
    cos = torch.cat([ang, ang], -1).cos().float()
    sin = torch.cat([-ang, ang], -1).sin().float()
    split = lib.attention_split
    positions = sorted({p for p in (0, split - 1, split, capacity // 2 + 3, capacity - 1) if p < capacity})
    for t, pos in enumerate(positions):
        gen = torch.Generator(device="cuda").manual_seed(1000 * capacity + t)
        qkv = torch.randn((nh + 2 * nkv) * hd, device="cuda", generator=gen).to(dtype)
        k_cache = torch.randn(nkv, capacity, hd, device="cuda", generator=gen).to(dtype)
        v_cache = torch.randn(nkv, capacity, hd, device="cuda", generator=gen).to(dtype)
        want, k_new, v_new = attention_reference(qkv, pos, cos, sin, k_cache, v_cache, nh, nkv, window)
        before_k, before_v = k_cache.clone(), v_cache.clone()
        out = torch.full((nh * hd,), float("nan"), device="cuda", dtype=dtype)
        lib.decode_attention(qkv, torch.tensor([pos], device="cuda"), cos, sin, k_cache, v_cache, window, out)
        torch.cuda.synchronize()
        assert rel_err(out, want) <= 1e-2, (capacity, window, pos)
        # k: rope in fp32 there, fp64 here, so one rounding step apart at most
        torch.testing.assert_close(k_cache[:, pos].float(), k_new.float(), rtol=8e-3, atol=1e-3)
        assert torch.equal(v_cache[:, pos], v_new)
        others = torch.arange(capacity, device="cuda") != pos
        assert torch.equal(k_cache[:, others], before_k[:, others])
        assert torch.equal(v_cache[:, others], before_v[:, others])
