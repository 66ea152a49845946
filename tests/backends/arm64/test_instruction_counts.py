"""Deterministic cost of the sparse FFN: instructions and loaded bytes under qemu (our TCG plugin).

SmolLM2's FFN shape (576 x 1536), fp32, 90% of neurons inactive, gcc pinned (Debian aarch64-linux-gnu-gcc 12).
Counts are exact and repeatable, so floors may be asserted; timings never are.
"""
from __future__ import annotations

import pytest
from arm64_cases import make_variant, needs

from tscompile.errors import UserError

pytestmark = [needs("qemu-aarch64"), needs("aarch64-linux-gnu-gcc"), needs("apt-get")]


@pytest.fixture(scope="module")
def plugin():
    from tscompile.backends.arm64 import qemu_plugin
    try:
        qemu_plugin.build_plugin()
    except UserError as e:            # the header comes from Debian's source package: needs the network once
        pytest.skip(f"qemu plugin unavailable: {e}")


@pytest.fixture(scope="module")
def ffn_bench(plugin, tmp_path_factory):
    from tscompile.backends.arm64 import bench
    return bench.build_ffn_bench(tmp_path_factory.mktemp("ffn_bench"))


def test_sparse_ffn_instruction_and_byte_counts(ffn_bench):
    from tscompile.backends.arm64 import bench
    dense = bench.ffn_call_costs(ffn_bench["aarch64"], "dense")
    sparse = bench.ffn_call_costs(ffn_bench["aarch64"], "sparse")
    weights = 3 * 576 * 1536 * 4
    assert dense["loaded_bytes"] >= weights                      # a dense FFN reads every weight once
    assert dense["instructions"] / sparse["instructions_without_predictor"] >= 8.0
    assert dense["instructions"] / sparse["instructions"] >= 5.0   # the rank-72 predictor included
    assert dense["loaded_bytes"] / sparse["loaded_bytes_without_predictor"] >= 8.0
    assert sparse["predictor_instructions"] > 0
    again = bench.ffn_call_costs(ffn_bench["aarch64"], "sparse")
    assert again == sparse                                       # deterministic


def test_moe_decode_step_runs_only_the_routed_experts(plugin, tmp_path):
    """Per decode step, the down projections (rows_axpy, FFN-only) cost top_k expert calls per layer: routing
    2 of 4 experts does exactly half the expert work of routing all 4 (--dense: fixed work per call)."""
    from tscompile.backends.arm64 import BACKEND, bench
    ir, _ = make_variant("mixtral-drelu-experts-f32")
    costs = {}
    for top_k in (2, 4):
        ir.config.num_experts_per_tok = top_k
        out = tmp_path / f"top{top_k}"
        BACKEND.lower(ir, BACKEND.config(), out, None)
        cmd = [str(out / "bin" / "tsrun"), str(out / "weights.bin"), "--prompt-ids", "1", "--steps", "0",
               "--print-ids", "--ignore-eos", "--dense"]
        costs[top_k] = bench.per_call_counts(cmd, 1, 3, 5)
    axpy = {k: c["rows_axpy_f32"][0] for k, c in costs.items()}
    assert axpy[4] == 2 * axpy[2] > 0
    assert costs[4]["ffn_forward"][0] == 2 * costs[2]["ffn_forward"][0]
