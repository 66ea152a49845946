"""ctypes bindings of the generated kernel library (libtscffn.so) and the fixed-size buffers its kernels share.

Every call launches on the current torch stream, so a step made of these calls can be captured in a CUDA graph.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

from .kernels import ACTIVATION_ENUM

_P = ctypes.c_void_p
_I = ctypes.c_int
_F = ctypes.c_float


class KernelLibrary:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.lib = ctypes.CDLL(str(self.path))
        if hasattr(self.lib, "tsc_sparse_ffn"):   # not in an MoE model's library (no dense FFN kernel)
            self.lib.tsc_sparse_ffn.argtypes = [_I, _I, _I, _P, _P, _F, _P, _P, _P, _P, _P, _P, _F, _P, _I, _P, _P,
                                                _P, _P]
        if hasattr(self.lib, "tsc_sparse_ffn_exact"):   # built with the decode-step kernels
            self.lib.tsc_sparse_ffn_exact.argtypes = [_I, _I, _P, _P, _F, _P, _P, _P, _P, _P, _F, _P, _I, _P, _P, _P,
                                                      _P]
        self.lib.tsc_predict.argtypes = [_I, _P, _P, _F, _P, _P, _I, _I, _F, _P, _P, _P, _P, _P]
        self.lib.tsc_predict_active.argtypes = [_I, _P, _P, _F, _P, _I, _I, _F, _P, _P, _P, _P]
        self.lib.tsc_error_string.restype = ctypes.c_char_p
        self.lib.tsc_set_dependent_launch.argtypes = [_I]
        self.hidden = self.lib.tsc_hidden_size()
        self.inter = self.lib.tsc_intermediate_size()
        self.max_batch = self.lib.tsc_max_batch()
        self.has_decode_kernels = hasattr(self.lib, "tsc_gemv")   # built from a shape with attention heads
        if self.has_decode_kernels:
            self.lib.tsc_gemv.argtypes = [_I, _I, _I, _P, _P, _F, _P, _P, _P, _P, _F, _I, _P, _P, _P, _P, _P, _I,
                                          _P, _P, _P]
            self.lib.tsc_decode_attention.argtypes = [_P, _P, _P, _P, _P, _P, _I, _I, _P, _P]
            self.heads, self.kv_heads = self.lib.tsc_num_heads(), self.lib.tsc_num_kv_heads()
            self.head_dim, self.attention_split = self.lib.tsc_head_dim(), self.lib.tsc_attention_split()

    def set_dependent_launch(self, on: bool) -> None:
        """Programmatic dependent launch on sm_90+ (on by default); off gives plain launches, for comparison."""
        self.lib.tsc_set_dependent_launch(int(on))

    def _check(self, err: int, what: str) -> None:
        if err:
            raise RuntimeError(f"{self.path.name}: {what}: {self.lib.tsc_error_string(err).decode()}")

    def sparse_ffn(self, x, w_gate, w_up, w_down_t, activation: str, threshold: float, active, active_count,
                   token_mask, ws: "Workspace", y, grid: int, residual=None, norm=None, eps: float = 0.0) -> None:
        """y [B, hidden] = FFN(x [B, hidden]) (+ residual) over the neurons listed in active[:active_count];
        with norm (a [hidden] RMSNorm weight) the FFN input is rmsnorm(x)."""
        import torch
        stream = torch.cuda.current_stream().cuda_stream
        self._check(self.lib.tsc_sparse_ffn(
            x.shape[0], ACTIVATION_ENUM[activation], grid, x.data_ptr(), _ptr(norm), eps, w_gate.data_ptr(),
            w_up.data_ptr(), w_down_t.data_ptr(), active.data_ptr(), active_count.data_ptr(), _ptr(token_mask),
            float(threshold), ws.partials.data_ptr(), ws.partials.shape[0], ws.barrier.data_ptr(), _ptr(residual),
            y.data_ptr(), stream),
            "sparse_ffn")

    def sparse_ffn_exact(self, x, w_gate, w_up, w_down_t, activation: str, threshold: float, gate,
                         ws: "Workspace", y, grid: int, residual=None, norm=None, eps: float = 0.0) -> None:
        """y [1, hidden] = FFN(x) (+ residual) with exact gating. relu, drelu: over the neurons with g > 0, gate =
        (g, its sign bits) as gemv(..., positive=) writes them (fp32 [1, inter], int16 [ceil(inter / 16)]); swiglu,
        geglu: over every neuron (gate None). Down rows are read only where h != 0."""
        import torch
        if gate is not None and (gate[0].dtype != torch.float32 or gate[0].numel() != self.inter
                                 or gate[1].dtype != torch.int16 or gate[1].numel() != -(-self.inter // 16)):
            raise ValueError(f"sparse_ffn_exact: gate must be (float32 [{self.inter}], int16 [{-(-self.inter // 16)}])")
        stream = torch.cuda.current_stream().cuda_stream
        self._check(self.lib.tsc_sparse_ffn_exact(
            ACTIVATION_ENUM[activation], grid, x.data_ptr(), _ptr(norm), eps, w_gate.data_ptr(), w_up.data_ptr(),
            w_down_t.data_ptr(), *(_ptr(t) for t in (gate or (None, None))), float(threshold), ws.partials.data_ptr(),
            ws.partials.shape[0],
            ws.barrier.data_ptr(), _ptr(residual), y.data_ptr(), stream), "sparse_ffn_exact")

    def predict(self, x, fc1, fc2, relu: bool, threshold: float, ws: "Workspace", norm=None,
                eps: float = 0.0) -> None:
        """ws.active[:ws.active_count] = neurons whose predictor logit >= threshold for some token of x (of
        rmsnorm(x) with norm)."""
        import torch
        stream = torch.cuda.current_stream().cuda_stream
        self._check(self.lib.tsc_predict(
            x.shape[0], x.data_ptr(), _ptr(norm), eps, fc1.data_ptr(), fc2.data_ptr(), fc1.shape[0], int(relu),
            float(threshold), ws.z.data_ptr(), ws.active.data_ptr(), ws.active_count.data_ptr(),
            ws.token_mask.data_ptr(), stream), "predict")

    def predict_folded(self, x, fc2, relu: bool, threshold: float, ws: "Workspace", eps: float) -> None:
        """The predictor of one token whose first layer ran in the decode step's o_proj GEMV (GPUDecoder), which
        left ws.z = fc1 (w_post x): ws.active[:ws.active_count] = neurons with fc2 act(ws.z / rms(x)) >= threshold,
        x [1, hidden] the FFN's input before its RMSNorm, ws.active_count zeroed beforehand (gemv(..., zero=))."""
        import torch
        stream = torch.cuda.current_stream().cuda_stream
        self._check(self.lib.tsc_predict_active(
            1, ws.z.data_ptr(), x.data_ptr(), eps, fc2.data_ptr(), fc2.shape[1], int(relu),
            float(threshold), ws.active.data_ptr(), ws.active_count.data_ptr(), ws.token_mask.data_ptr(), stream),
            "predict_folded")

    def gemv(self, x, w, y, norm=None, eps: float = 0.0, bias=None, residual=None, up=None,
             activation: str | None = None, threshold: float = 0.0, positive=None, extra=None, zero=None) -> None:
        """One token: y [n] = w [n, k] rmsnorm(x) (+ bias) (+ residual), x [k] (norm None: x as is); y may be
        float32 (logits) or the model dtype and may be the residual itself. With `up` and `activation`:
        y = act(w rmsnorm(x), up rmsnorm(x)), zero where |y| <= threshold. positive (int16 [ceil(n / 16)], without
        activation): bit r % 16 of word r / 16 set where y[r] > 0. extra = (w_extra, w_extra2 [m, k], x2 [k],
        y_extra float32 [m]) (y in the model dtype, no activation or positive, n a multiple of 16): y_extra =
        w_extra (x * norm) + w_extra2 x2 in the same launch, without the norm's 1/rms. zero (int32 [1]): set to 0
        once the previous kernel is done."""
        import torch
        stream = torch.cuda.current_stream().cuda_stream
        act = -1 if activation is None else ACTIVATION_ENUM[activation]
        w_extra, w_extra2, x2, y_extra = extra or (None,) * 4
        self._check(self.lib.tsc_gemv(
            w.shape[1], act, w.shape[0], x.data_ptr(), _ptr(norm), eps, w.data_ptr(), _ptr(up), _ptr(bias),
            _ptr(residual), float(threshold), int(y.dtype == torch.float32), y.data_ptr(), _ptr(positive),
            _ptr(w_extra), _ptr(w_extra2), _ptr(x2), 0 if w_extra is None else w_extra.shape[0], _ptr(y_extra),
            _ptr(zero), stream), "gemv")

    def decode_attention(self, qkv, pos, cos, sin, k_cache, v_cache, window: int, out) -> None:
        """One token at pos [1] (int64): rope, k/v into the caches [kv_heads, capacity, head_dim] at pos, and
        out [heads * head_dim] = attention over positions [pos - window + 1 (or 0), pos]."""
        import torch
        stream = torch.cuda.current_stream().cuda_stream
        self._check(self.lib.tsc_decode_attention(
            qkv.data_ptr(), pos.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
            k_cache.shape[1], int(window or 0), out.data_ptr(), stream), "decode_attention")


def _ptr(t):
    return None if t is None else t.data_ptr()


class Workspace:
    """Device buffers of worst-case size, allocated once (graph capture bakes their addresses in)."""

    def __init__(self, lib: KernelLibrary, max_rank: int, max_batch: int, device="cuda"):
        import torch
        hidden, inter = lib.hidden, lib.inter
        # sparse_ffn: each block's fp32 partial y (one block per multiprocessor: it asks for more than half of
        # one's shared memory, persistent_blocks in ffn.cu.j2), the barrier counter
        blocks = torch.cuda.get_device_properties(device).multi_processor_count
        self.partials = torch.zeros(blocks, max_batch, hidden, dtype=torch.float32, device=device)
        self.barrier = torch.zeros(1, dtype=torch.int32, device=device)
        self.z = torch.zeros(max_batch, max(max_rank, 8), dtype=torch.float32, device=device)
        self.active = torch.zeros(inter, dtype=torch.int32, device=device)
        self.active_count = torch.zeros(1, dtype=torch.int32, device=device)
        self.token_mask = torch.zeros(max_batch, inter, dtype=torch.uint8, device=device)
        # exact gating: g = Wg rmsnorm(x) and its sign bits (gemv -> sparse_ffn_exact)
        self.gate = (torch.zeros(1, inter, dtype=torch.float32, device=device),
                     torch.zeros(-(-inter // 16), dtype=torch.int16, device=device))


def default_grid(device=None) -> int:
    """Blocks of the persistent sparse_ffn grid: one per multiprocessor (its shared-memory ring fills one)."""
    import torch
    return torch.cuda.get_device_properties(device).multi_processor_count
