"""The generated C: snapshots against goldens, hand-written style, Android compile check of the kernels.

Regenerate the goldens after a template change with TSCOMPILE_UPDATE_GOLDENS=1 (and review the diff).
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from arm64_cases import needs
from tscompile.backends.arm64.sources import KERNEL_FILES, render_build_files, render_sources

from tscompile.errors import UserError
from tscompile.ir import LayerSparsity, ModelIR, Predictor, Weights
from tscompile.tiny import add_random_predictors, make_tiny_ir, tiny_config

GOLDEN = Path(__file__).parents[2] / "golden" / "arm64"
MOE_GOLDEN_FILES = ("model.h", "ffn.c")   # the MoE structs and routing (the other files: asserted below)
UPDATE = os.environ.get("TSCOMPILE_UPDATE_GOLDENS") == "1"


def model_irs() -> dict[str, tuple[ModelIR, str]]:
    """Shapes only (the sources do not depend on weight values)."""
    qwen = tiny_config("qwen2", layers=2)
    qwen_layers = [LayerSparsity(activation="relu", threshold=0.01, mode="predictor",
                                 predictor=Predictor(rank=12, threshold=-0.25, relu=True)),
                   LayerSparsity(activation="drelu", mode="exact")]
    mistral = tiny_config("mistral", layers=2, sliding_window=64)
    mistral_layers = [LayerSparsity(activation="swiglu"), LayerSparsity(activation="geglu", threshold=0.05)]
    # the golden: every template branch but tied embeddings (bias + sliding window + every mode and activation)
    golden = tiny_config("mistral", layers=4, sliding_window=64)
    golden.attention_bias = True
    golden_layers = [qwen_layers[0], qwen_layers[1], mistral_layers[0],
                     LayerSparsity(activation="geglu", threshold=0.05, mode="predictor",
                                   predictor=Predictor(rank=8, threshold=0.5, relu=False))]
    # Mixtral: 3 experts of mixed kinds per layer (one with a predictor), top-2
    moe = tiny_config("mixtral", layers=2, experts=3, top_k=2)
    moe_layers = [LayerSparsity(activation="drelu", experts=[
        LayerSparsity(activation="drelu", mode="predictor", predictor=Predictor(rank=6, threshold=0.1, relu=True)),
        LayerSparsity(activation="drelu", threshold=0.01, mode="exact"), LayerSparsity(activation="drelu")])
        for _ in range(2)]
    return {"qwen2-relu-predictor-f32": (ModelIR(qwen, Weights(), None, qwen_layers, {"source": "tiny:qwen2"}),
                                         "float32"),
            "mixtral-drelu-experts-f32": (ModelIR(moe, Weights(), None, moe_layers, {"source": "tiny:mixtral"}),
                                          "float32"),
            "mistral-swiglu-geglu-f16": (ModelIR(mistral, Weights(), None, mistral_layers,
                                                 {"source": "tiny:mistral"}), "float16"),
            "golden": (ModelIR(golden, Weights(), None, golden_layers, {"source": "tiny:golden"}), "float16")}


def generated(name: str) -> dict[str, str]:
    ir, dtype = model_irs()[name]
    return {**render_sources(ir, dtype), **render_build_files(None)}


@pytest.mark.parametrize("name,golden,fnames", [("golden", GOLDEN, None),
                                                  ("mixtral-drelu-experts-f32", GOLDEN / "moe", MOE_GOLDEN_FILES)])
def test_generated_sources_match_goldens(name, golden, fnames):
    files = {f: text for f, text in generated(name).items() if fnames is None or f in fnames}
    if UPDATE:
        for old in golden.glob("*.*"):
            old.unlink()
        golden.mkdir(parents=True, exist_ok=True)
        for fname, text in files.items():
            (golden / fname).write_text(text)
    assert sorted(p.name for p in golden.glob("*.*")) == sorted(files), "file set changed (TSCOMPILE_UPDATE_GOLDENS=1)"
    for fname, text in files.items():
        assert text == (golden / fname).read_text(), f"{fname} differs from its golden (TSCOMPILE_UPDATE_GOLDENS=1)"


def test_sources_follow_the_model():
    q = generated("qwen2-relu-predictor-f32")
    m = generated("mistral-swiglu-geglu-f16")
    assert "L->bq[i]" in q["forward.c"] and "L->bq" not in m["forward.c"]              # qkv bias
    assert "SLIDING_WINDOW + 1" in m["forward.c"] and "int first = 0;" in q["forward.c"]
    assert "w->lm_head = w->embed;" in q["weights.c"] and '"lm_head"' in m["weights.c"]  # tied / untied
    assert "{ ACT_RELU, MODE_PREDICTOR, 12, 1, 0.00999999978f, -0.25f }" in q["ffn.c"]
    assert "#define WEIGHT_DTYPE   1 " in m["model.h"] and "#define SLIDING_WINDOW 64 " in m["model.h"]
    assert "N_EXPERTS" not in q["model.h"] + q["ffn.c"] + q["weights.c"] and "moe_forward" not in q["forward.c"]


def test_moe_sources_route_to_per_expert_ffns():
    x = generated("mixtral-drelu-experts-f32")
    assert "#define N_EXPERTS      3 " in x["model.h"] and "#define TOP_K          2 " in x["model.h"]
    assert "#define N_FFNS         (N_LAYERS * N_EXPERTS)" in x["model.h"]
    assert "FFNWeights experts[N_EXPERTS];" in x["model.h"] and "const float *router;" in x["model.h"]
    # one spec per expert, layer-major, each with its own mode, threshold and predictor
    specs = re.findall(r"// (layer \d expert \d): .*\n\s*(\{.*\})", x["ffn.c"])
    assert [u for u, _ in specs] == [f"layer {i} expert {e}" for i in range(2) for e in range(3)]
    assert [v for _, v in specs[:3]] == ["{ ACT_DRELU, MODE_PREDICTOR, 6, 1, 0.0f, 0.100000001f }",
                                         "{ ACT_DRELU, MODE_EXACT, 0, 0, 0.00999999978f, 0.0f }",
                                         "{ ACT_DRELU, MODE_DENSE, 0, 0, 0.0f, 0.0f }"]
    assert "moe_forward(m, l, s->xb, s->xb2);" in x["forward.c"] and "&w->layers[l].ffn" not in x["forward.c"]
    assert "LAYER_TENSOR(router, 0, N_EXPERTS, DIM);" in x["weights.c"]


@pytest.mark.parametrize("name", list(model_irs()))
def test_sources_read_like_hand_written_code(name):
    for fname, text in generated(name).items():
        assert "{{" not in text and "{%" not in text and "\n\n\n\n" not in text, fname
        if fname.endswith((".c", ".h")):
            assert text.startswith("// "), f"{fname}: no header comment"
            assert max(len(line) for line in text.splitlines()) <= 120, fname
            if fname.endswith(".c") and len(text.splitlines()) > 60:
                assert "// ------------" in text, f"{fname}: no section banners"
    # every buffer says its shape: arrays in their declaration, pointers in a comment, in the struct that holds
    # them or on the line that allocates them
    sources = {f: text for f, text in generated(name).items() if f.endswith((".c", ".h"))}
    members = set()
    for fname, text in sources.items():
        for names, line in buffer_members(text):
            assert SHAPE.search(line), f"{fname}: buffer without a shape comment: {line.strip()}"
            members.update(names)
    assert {"out", "coef", "data", "merge_keys", "logits", "threads"} <= members
    for fname, text in sources.items():
        for line in filter(ALLOC.search, text.splitlines()):
            member = re.match(r"\s*\w+->(\w+) = ", line)
            assert member[1] in members if member else SHAPE.search(line), \
                f"{fname}: allocated buffer without a shape comment: {line.strip()}"


SHAPE = re.compile(r"//.*\[")
ALLOC = re.compile(r"\b(?:malloc|calloc|mmap)\((?!1, |sizeof\()")   # not of one object
NOT_BUFFERS = {"ctx", "slot"}   # the pool job's opaque argument; the one Weights field a tensor goes to


def buffer_members(text: str):
    """(names, line) of each struct member line declaring pointers that are buffers: not pointers to one
    struct (a capitalised type), not C strings, not NOT_BUFFERS."""
    for body in re.findall(r"\bstruct(?: \w+)? \{(.*?)\}", text, re.DOTALL):
        for line in body.splitlines():
            m = re.match(r"\s*(?:const )?(\w+)\s+(\*+\w+(?:, \*+\w+)*);", line)
            names = set(re.findall(r"\w+", m[2])) if m else set()
            if m and not m[1][0].isupper() and m[1] != "char" and not names <= NOT_BUFFERS:
                yield names, line


@needs("clang")
def test_kernel_files_compile_for_android(tmp_path):
    files = generated("mistral-swiglu-geglu-f16")
    for fname, text in files.items():
        (tmp_path / fname).write_text(text)
    for fname in KERNEL_FILES:
        includes = set(re.findall(r'#include [<"]([^>"]+)[>"]', files[fname]))
        assert includes <= {"arm_neon.h", "stdint.h", "stddef.h", "kernels.h"}, (fname, includes)
        assert set(re.findall(r'#include [<"]([^>"]+)[>"]', files["kernels.h"])) <= {"stdint.h", "stddef.h"}
        arch = ["-march=armv8.2-a+fp16"] if fname == "kernels_neon_fp16.c" else []
        res = subprocess.run(["clang", "--target=aarch64-linux-android28", "-ffreestanding", "-std=c11", "-O2",
                              "-Wall", "-Wextra", "-Werror", *arch, "-c", str(tmp_path / fname), "-o",
                              str(tmp_path / (fname + ".o"))], check=False, capture_output=True, text=True)
        assert res.returncode == 0, f"{fname}: {res.stderr[-1500:]}"


def test_unsupported_models_are_user_errors():
    moe = add_random_predictors(make_tiny_ir("mixtral", "swiglu", experts=2, layers=2), rank=4)
    moe.layers[1].experts[1].predictor.rank = 999
    with pytest.raises(UserError, match=r"layers\[1\]\.experts\[1\]\.predictor\.rank 999 is outside 1\.\.192"):
        render_sources(moe, "float32")


@needs("clang")
@pytest.mark.skipif(not Path("/usr/aarch64-linux-gnu/include").is_dir(), reason="no aarch64 glibc headers")
@pytest.mark.parametrize("name", ["golden", "mixtral-drelu-experts-f32"])
def test_all_sources_compile_with_clang_warnings_as_errors(tmp_path, name):
    """gcc builds the binaries; clang (the Android NDK's compiler) must accept the same sources."""
    files = generated(name)
    for fname, text in files.items():
        (tmp_path / fname).write_text(text)
    for fname in (f for f in files if f.endswith(".c")):
        arch = ["-march=armv8.2-a+fp16"] if fname == "kernels_neon_fp16.c" else ["-march=armv8-a"]
        res = subprocess.run(["clang", "--target=aarch64-linux-gnu", "-isystem", "/usr/aarch64-linux-gnu/include",
                              "-std=c11", "-O1", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", *arch, "-c",
                              str(tmp_path / fname), "-o", str(tmp_path / (fname + ".o"))],
                             check=False, capture_output=True, text=True)
        assert res.returncode == 0, f"{fname}: {res.stderr[-1500:]}"


def test_toolchain_file_emulates_the_configured_cpu():
    assert "qemu-aarch64 -cpu cortex-a53 -L" in render_build_files(None, "cortex-a53")["toolchain-aarch64.cmake"]
