"""Whole tiny models through the cuda runtime on a GPU (generated kernels + CUDA-graph decode) against the
reference: logits teacher-forced over the reference's greedy tokens, then the runner's own greedy tokens.
Skipped without a CUDA GPU."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from golden_cases import CASES, PROMPT, STEPS, assert_same_greedy, case_ir  # noqa: E402
from tscompile.backends.cuda import BACKEND, CudaConfig  # noqa: E402
from tscompile.backends.cuda.kernels import device_arch  # noqa: E402
from tscompile.backends.cuda.lower import rounded_ir  # noqa: E402
from tscompile.verify import ReferenceRunner, compare_logits  # noqa: E402


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", CASES)
def test_runner_matches_reference(name, dtype, tmp_path):
    ir = case_ir(name)
    arch = device_arch()
    BACKEND.lower(ir, CudaConfig(arch=arch, dtype=dtype), tmp_path)
    runner = BACKEND.load(tmp_path)
    ref = ReferenceRunner(rounded_ir(ir, getattr(torch, dtype)), "batched")
    want_tokens = ref.generate(PROMPT, STEPS)
    tie = 0.02 if dtype == "bfloat16" else 0.005   # float16 has 3 more mantissa bits: tighter

    def check_greedy(r, prompt, n):
        want = ref.generate(prompt, n)
        assert_same_greedy(r.generate(prompt, n), want, ref.logits(prompt, want[:-1]), tie)

    want_logits = ref.logits(PROMPT, want_tokens[:-1])
    m = compare_logits(runner.logits(PROMPT, want_tokens[:-1]), want_logits)
    # predictor gating is a step function: a logit within rounding of its threshold flips a neuron on or off,
    # so gated models get a looser bound (a wrong kernel is off by O(1), not by a few percent)
    gated = any(ann.mode == "predictor" for _, _, ann in ir.ffn_units())   # MoE: any expert
    # a dense FFN's predictor rides on the o_proj GEMV (heads * head_dim == hidden in every case)
    assert bool(runner.model.folded) == (gated and not ir.config.is_moe)
    assert m["rel_l2"] < (2e-2 if dtype == "bfloat16" else 5e-3) * (2 if gated else 1), m
    assert m["top1"] >= 0.9, m
    check_greedy(runner, PROMPT, STEPS)
    check_greedy(runner, PROMPT[:3], 4)          # a second prompt through the same captured graph
    assert len(runner.generate(PROMPT * 40, 3)) == 3   # a longer one: the cache and the graph grow
    dense = BACKEND.load(tmp_path, dense=True)
    if not gated:   # the dense baseline computes the same function when there is no gating
        check_greedy(dense, PROMPT, STEPS)
    assert runner.decode_tokens_per_second(PROMPT, 8) > 0 and dense.decode_tokens_per_second(PROMPT, 8) > 0


def test_artifact_built_for_another_gpu_is_rebuilt(tmp_path):
    """An artifact lowered for the other arch than this GPU's loads by recompiling its ffn.cu with nvcc."""
    ir = case_ir("mistral-drelu-predictor")
    here = device_arch()
    other = "sm_80" if here != "sm_80" else "sm_90"
    BACKEND.lower(ir, CudaConfig(arch=here), tmp_path / "here")
    BACKEND.lower(ir, CudaConfig(arch=other), tmp_path / "other")
    want = BACKEND.load(tmp_path / "here").logits(PROMPT, [5, 6, 7])
    got = BACKEND.load(tmp_path / "other").logits(PROMPT, [5, 6, 7])
    assert compare_logits(got, want)["rel_l2"] < 1e-3


def test_mode_dense_runs_on_the_dense_kernels(tmp_path):
    """FFNs in mode dense (every neuron, the dense GEMV and cuBLAS) match the reference."""
    ir = case_ir("mistral-drelu-predictor").clone()   # case_ir's models are shared by every test
    for ann in ir.layers:
        ann.mode = "dense"
    BACKEND.lower(ir, CudaConfig(arch=device_arch()), tmp_path)
    runner = BACKEND.load(tmp_path)
    assert all(f.dense for f in runner.model.ffns) and not runner.model.folded
    ref = ReferenceRunner(rounded_ir(ir, torch.bfloat16), "batched")
    want = ref.generate(PROMPT, STEPS)
    m = compare_logits(runner.logits(PROMPT, want[:-1]), ref.logits(PROMPT, want[:-1]))
    assert m["rel_l2"] < 2e-2 and m["top1"] >= 0.9, m


def test_an_artifact_of_another_backend_version_is_refused_in_one_line(tmp_path):
    import json

    from tscompile.errors import UserError
    BACKEND.lower(case_ir("mistral-drelu-predictor"), CudaConfig(arch=device_arch()), tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest | {"backend_version": "2"}))
    with pytest.raises(UserError, match=rf"^{tmp_path}: lowered by cuda backend version 2, this tscompile runs "
                                        rf"version {BACKEND.version}: build it again$"):
        BACKEND.load(tmp_path)
