"""Load a cuda artifact and run it: prefill in one batched exact forward, then each decode step as one replay of
a CUDA graph (the step feeds its own greedy token back, so generation needs no host round trip per token)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from tscompile.cache import load_manifest
from tscompile.errors import UserError

log = logging.getLogger("tscompile")
CAPACITY_STEP = 256   # KV cache capacity grows in these steps (each growth re-captures the graph)


def library_for_device(outdir: Path, manifest: dict):
    """The artifact's kernel library, rebuilt from its ffn.cu when it was built for another GPU or won't load."""
    from .kernels import LIBRARY, compile_library, device_arch
    from .library import KernelLibrary
    arch = device_arch()
    lib_path = outdir / LIBRARY
    if lib_path.exists() and manifest["arch"] == arch:
        try:
            return KernelLibrary(lib_path)
        except OSError as e:
            log.warning("%s does not load here (%s); rebuilding with nvcc", lib_path, e)
    return KernelLibrary(compile_library((outdir / "ffn.cu").read_text(), arch))


class CudaRunner:
    """The Runner contract (tscompile/api.py) over a GPUDecoder; a dense decoder computes every FFN densely."""
    prefill = "batched"

    def __init__(self, decoder):
        import torch
        self.model = decoder
        dev = decoder.dev
        self.tok = torch.zeros(1, dtype=torch.long, device=dev)       # token fed to the next step
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)       # its position
        self.graph = None
        self.graph_capacity = 0

    # ---- the captured step ----------------------------------------------------------------------------------

    def _step(self):
        """logits of (tok at pos); then tok <- argmax, pos <- pos + 1, out_tokens[pos] <- tok."""
        self.logits_out.copy_(self.model.forward(self.tok, self.pos)[0])
        self.tok.copy_(self.logits_out.argmax().view(1))
        self.pos.add_(1)
        self.out_tokens.index_copy_(0, self.pos.clamp(max=self.graph_capacity - 1), self.tok)

    def _capture(self, capacity: int) -> None:
        import torch
        m = self.model
        m.reset(capacity)
        self.graph_capacity = capacity
        self.logits_out = torch.zeros(m.cfg.vocab_size, dtype=torch.float32, device=m.dev)
        self.out_tokens = torch.zeros(capacity, dtype=torch.long, device=m.dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            self._step()   # warm-up outside the graph (cuBLAS handles, allocator); state is reset below
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self._step()

    def _prefill(self, prompt_ids: list[int], extra: int):
        """Run the prompt; the cache holds len(prompt) + extra positions. Returns float32 logits of its last token."""
        import torch
        if not prompt_ids:
            raise UserError("cuda runner: the prompt is empty")
        need = len(prompt_ids) + extra + 1
        if self.graph is None or need > self.graph_capacity:
            self._capture(-(-need // CAPACITY_STEP) * CAPACITY_STEP)
        m = self.model
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=m.dev)
        with torch.no_grad():
            m.k.zero_()
            m.v.zero_()
            logits = m.forward(ids, torch.arange(len(ids), device=m.dev))[-1]
        self.pos.fill_(len(prompt_ids))
        return logits

    # ---- Runner -----------------------------------------------------------------------------------------------

    def logits(self, prompt_ids: list[int], forced_ids: list[int]):
        import torch
        rows = [self._prefill(prompt_ids, len(forced_ids))]
        for t in forced_ids:
            self.tok.fill_(t)
            self.graph.replay()
            rows.append(self.logits_out.clone())
        return torch.stack(rows).cpu().numpy()

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        if max_new_tokens <= 0:
            return []
        first = int(self._prefill(prompt_ids, max_new_tokens).argmax())
        self.tok.fill_(first)
        for _ in range(max_new_tokens - 1):
            self.graph.replay()
        p = len(prompt_ids)
        return [first] + self.out_tokens[p + 1: p + max_new_tokens].tolist()

    def decode_tokens_per_second(self, prompt_ids: list[int], n_tokens: int) -> float:
        import torch
        first = int(self._prefill(prompt_ids, n_tokens + 2).argmax())
        self.tok.fill_(first)
        self.graph.replay()   # one untimed step
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            self.graph.replay()
        torch.cuda.synchronize()
        return n_tokens / (time.perf_counter() - t0)


def load_runner(outdir, dense: bool = False) -> CudaRunner:
    import torch
    from safetensors.torch import load_file
    from tscompile.ir import ArchConfig
    from .model import FFNSpec, GPUDecoder
    from . import BACKEND, available
    why = available()
    if why:
        raise UserError(f"{outdir}: cannot run the cuda target here: {why}")
    outdir = Path(outdir)
    manifest = load_manifest(outdir, ("arch_config", "ffns", "dtype", "arch"), "cuda")
    if manifest.get("backend_version", BACKEND.version) != BACKEND.version:   # (lower() alone writes none)
        raise UserError(f"{outdir}: lowered by cuda backend version {manifest['backend_version']}, this tscompile "
                        f"runs version {BACKEND.version}: build it again")
    for name in ("weights.safetensors", "ffn.cu"):
        if not (outdir / name).is_file():
            raise UserError(f"{outdir / name}: missing (the cuda artifact is incomplete: build it again)")
    cfg = ArchConfig(**manifest["arch_config"])
    ffns = [FFNSpec(**f) for f in manifest["ffns"]]
    weights = load_file(str(outdir / "weights.safetensors"), device="cuda")
    lib = library_for_device(outdir, manifest)   # the dense baseline runs the same attention/GEMV kernels
    dtype = getattr(torch, manifest["dtype"])
    return CudaRunner(GPUDecoder(cfg, ffns, weights, lib, dtype, dense=dense))
