"""The PyTorch half of the cuda runtime on the CPU (float32, no kernel library) next to the reference."""
from __future__ import annotations

import torch
from golden_cases import PROMPT
from tscompile.backends.cuda.lower import ffn_specs, gpu_weights
from tscompile.backends.cuda.model import FFNSpec, GPUDecoder

from tscompile.reference import KVCache, ReferenceModel


def decode_on_cpu(ir, tokens, **gating) -> tuple[list, list]:
    """Logits of the runtime's decoder and of the reference (called with **gating) for PROMPT, then for each of
    `tokens` as one decode step."""
    dec = GPUDecoder(ir.config, [FFNSpec(**f) for f in ffn_specs(ir)], gpu_weights(ir, torch.float32), None,
                     torch.float32)
    dec.reset(16)
    ref, cache = ReferenceModel.from_ir(ir), KVCache.empty(ir.config.num_layers)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        got = [dec.forward(ids, torch.arange(len(ids)))]
        want = [ref(ids[None], cache=cache, **gating)[0]]
        for t in tokens:
            got.append(dec.forward(torch.tensor([t]), torch.tensor([cache.length])))
            want.append(ref(torch.tensor([[t]]), cache=cache, **gating)[0])
    return got, want
