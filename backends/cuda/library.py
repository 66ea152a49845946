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
        self.lib.tsc_sparse_ffn.argtypes = [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _F, _P, _P, _P, _P, _P]
        self.lib.tsc_predict.argtypes = [_I, _P, _P, _P, _I, _I, _F, _P, _P, _P, _P, _P]
        self.lib.tsc_error_string.restype = ctypes.c_char_p
        self.lib.tsc_set_dependent_launch.argtypes = [_I]
        self.hidden = self.lib.tsc_hidden_size()
        self.inter = self.lib.tsc_intermediate_size()
        self.max_batch = self.lib.tsc_max_batch()
        self.acc_replicas = self.lib.tsc_accumulator_replicas()

    def set_dependent_launch(self, on: bool) -> None:
        """Programmatic dependent launch on sm_90+ (on by default); off gives plain launches, for comparison."""
        self.lib.tsc_set_dependent_launch(int(on))

    def _check(self, err: int, what: str) -> None:
        if err:
            raise RuntimeError(f"{self.path.name}: {what}: {self.lib.tsc_error_string(err).decode()}")

    def sparse_ffn(self, x, w_gate, w_up, w_down_t, activation: str, threshold: float, active, active_count,
                   token_mask, ws: "Workspace", y, grid: int, residual=None) -> None:
        """y [B, hidden] = FFN(x [B, hidden]) (+ residual) over the neurons listed in active[:active_count]."""
        import torch
        stream = torch.cuda.current_stream().cuda_stream
        self._check(self.lib.tsc_sparse_ffn(
            x.shape[0], ACTIVATION_ENUM[activation], grid, x.data_ptr(), w_gate.data_ptr(), w_up.data_ptr(),
            w_down_t.data_ptr(), active.data_ptr(), active_count.data_ptr(),
            None if token_mask is None else token_mask.data_ptr(), float(threshold), ws.acc.data_ptr(),
            ws.blocks_done.data_ptr(), None if residual is None else residual.data_ptr(), y.data_ptr(), stream),
            "sparse_ffn")

    def predict(self, x, fc1, fc2, relu: bool, threshold: float, ws: "Workspace") -> None:
        """ws.active[:ws.active_count] = neurons whose predictor logit >= threshold for some token of x."""
        import torch
        stream = torch.cuda.current_stream().cuda_stream
        self._check(self.lib.tsc_predict(
            x.shape[0], x.data_ptr(), fc1.data_ptr(), fc2.data_ptr(), fc1.shape[0], int(relu), float(threshold),
            ws.z.data_ptr(), ws.active.data_ptr(), ws.active_count.data_ptr(), ws.token_mask.data_ptr(),
            stream), "predict")


class Workspace:
    """Device buffers of worst-case size, allocated once (graph capture bakes their addresses in)."""

    def __init__(self, lib: KernelLibrary, max_rank: int, max_batch: int, device="cuda"):
        import torch
        hidden, inter = lib.hidden, lib.inter
        # fp32 accumulator copies and the blocks-finished counter: zero between calls
        self.acc = torch.zeros(lib.acc_replicas, max_batch, hidden, dtype=torch.float32, device=device)
        self.blocks_done = torch.zeros(1, dtype=torch.int32, device=device)
        self.z = torch.zeros(max_batch, max(max_rank, 8), dtype=torch.float32, device=device)
        self.active = torch.zeros(inter, dtype=torch.int32, device=device)
        self.active_count = torch.zeros(1, dtype=torch.int32, device=device)
        self.token_mask = torch.zeros(max_batch, inter, dtype=torch.uint8, device=device)
        self.all_ids = torch.arange(inter, dtype=torch.int32, device=device)                 # dense/exact FFNs
        self.all_count = torch.full((1,), inter, dtype=torch.int32, device=device)


def default_grid(device=None) -> int:
    """Blocks of the persistent sparse_ffn grid: one per multiprocessor (its shared-memory ring fills one)."""
    import torch
    return torch.cuda.get_device_properties(device).multi_processor_count
