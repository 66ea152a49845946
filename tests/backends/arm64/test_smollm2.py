"""The real SmolLM2-135M (fp32, --dense) lowered to arm64 and run under qemu: logits of a short prompt and
two teacher-forced steps equal the stepwise reference. About 1 s per token under qemu, so kept short."""
from __future__ import annotations

import pytest
from arm64_cases import needs, stepwise_reference
from tscompile.verify import rel_l2
from tokenizers import Tokenizer
from tscompile.backends.arm64 import BACKEND

pytestmark = [needs("qemu-aarch64"), needs("aarch64-linux-gnu-gcc")]


@pytest.fixture(scope="module")
def smollm2_arm64(smollm2_ir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "arm64"
    manifest = BACKEND.lower(smollm2_ir, BACKEND.config(dtype="float32"), out, None)
    return out, manifest


def test_smollm2_dense_logits_match_reference_under_qemu(smollm2_ir, smollm2_arm64):
    out, manifest = smollm2_arm64
    assert manifest["dims"] == {"vocab": 49152, "hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9,
                                "kv_heads": 3, "head_dim": 64, "sliding_window": None, "attention_bias": False,
                                "tied_embeddings": True, "experts": 0, "top_k": 0}
    tok = Tokenizer.from_str(smollm2_ir.tokenizer_json)
    prompt = tok.encode("The capital of France is").ids
    forced = tok.encode(" Paris.").ids[:2]
    runner = BACKEND.load(out, dense=True, where="qemu")
    got = runner.logits(prompt, forced)
    want = stepwise_reference(smollm2_ir, prompt, forced)
    assert got.shape == (1 + len(forced), 49152)
    assert rel_l2(got, want) <= 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()
