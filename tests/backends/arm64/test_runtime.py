"""The generated runtime against the PyTorch reference: under qemu (cortex-a76 / a53), on the host, under ASan+UBSan."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from arm64_cases import FORCED, PROMPT, VARIANTS, make_variant, needs, stepwise_greedy
from tscompile.verify import rel_l2
from tscompile.backends.arm64 import BACKEND
from tscompile.backends.arm64.build import build_binaries

from tscompile.errors import UserError

pytestmark = [needs("qemu-aarch64"), needs("aarch64-linux-gnu-gcc")]

WHERE = {"qemu-a76": {"where": "qemu", "cpu": "cortex-a76"}, "qemu-a53": {"where": "qemu", "cpu": "cortex-a53"},
         "host": {"where": "host"}, "host-asan": {"where": "host-asan"}}


@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_stepwise_reference(built, variant, where):
    b = built(variant)
    runner = BACKEND.load(b.outdir, **WHERE[where])
    got = runner.logits(PROMPT, FORCED)
    assert got.shape == (1 + len(FORCED), b.ir.config.vocab_size) and got.dtype == np.float32
    assert rel_l2(got, b.ref_logits) <= b.tol
    if b.dtype == "float32":
        assert (got.argmax(-1) == b.ref_logits.argmax(-1)).all()


def test_a_model_with_every_kind_of_tensor_fits_the_tensor_table(built):
    b = built("mixtral-bias-predictors-f32")   # 24 tensors: the table had room for 23 (ASan: global-buffer-overflow)
    for where in ("host-asan", "host", "qemu-a76"):
        assert rel_l2(BACKEND.load(b.outdir, **WHERE[where]).logits(PROMPT, FORCED), b.ref_logits) <= b.tol, where


@pytest.mark.parametrize("variant", VARIANTS)
def test_dense_and_exact_modes_compute_the_ungated_function(built, variant):
    b = built(variant)
    for opts in ({"dense": True}, {"exact": True}):
        got = BACKEND.load(b.outdir, where="qemu", **opts).logits(PROMPT, FORCED)
        assert rel_l2(got, b.ref_dense_logits) <= b.tol, opts


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.endswith("f32")])
def test_greedy_tokens_equal_reference(built, variant):
    b = built(variant)
    want = stepwise_greedy(b.ir, PROMPT, 10)
    for where in ("qemu-a76", "host"):
        assert BACKEND.load(b.outdir, **WHERE[where]).generate(PROMPT, 10) == want, where


def _stderr(runner, args, where=None):
    return runner.run(args, where=where).stderr.decode()


def test_isa_dispatch_picks_fp16_arithmetic_only_where_the_cpu_has_it(built):
    f16 = built("llama-geglu-relu-exact-f16")
    args = ["--prompt-ids", "1,2", "--steps", "2", "--print-isa"]
    a76 = _stderr(BACKEND.load(f16.outdir, where="qemu", cpu="cortex-a76"), args)
    a53 = _stderr(BACKEND.load(f16.outdir, where="qemu", cpu="cortex-a53"), args)
    assert "isa neon-f16-arith (cpu asimdhp: yes)" in a76
    assert "isa neon-f16 (cpu asimdhp: no)" in a53        # no SIGILL: the widening path ran
    assert "isa scalar-f16" in _stderr(BACKEND.load(f16.outdir, where="host"), args)
    f32 = built("qwen2-swiglu-dense-f32")
    assert "isa neon-f32" in _stderr(BACKEND.load(f32.outdir, where="qemu", cpu="cortex-a53"), args)


def test_fp16_arithmetic_kernels_really_need_armv8_2(built):
    """The dispatch matters: an fp16-arithmetic instruction on cortex-a53 is SIGILL (so the a53 run above
    proves the other path was taken)."""
    b = built("llama-geglu-relu-exact-f16")
    cmd = BACKEND.load(b.outdir).command("qemu")
    probe = b.outdir / "probe.c"
    probe.write_text("#include <arm_neon.h>\nint main(void){volatile float16x8_t a=vdupq_n_f16(1);"
                     "float16x8_t b=vfmaq_f16(a,a,a);return vgetq_lane_f16(b,0)==2?0:1;}\n")
    exe = b.outdir / "probe"
    subprocess.run(["aarch64-linux-gnu-gcc", "-O1", "-static", "-march=armv8.2-a+fp16", str(probe), "-o", str(exe)],
                   check=True)
    a53 = [c if c != "cortex-a76" else "cortex-a53" for c in cmd[:-1]]
    assert subprocess.run(a53 + [str(exe)], check=False, capture_output=True).returncode != 0
    assert subprocess.run(cmd[:-1] + [str(exe)], check=False, capture_output=True).returncode == 0


def test_predictor_gating_skips_neurons_and_dense_computes_all(built):
    b = built("mistral-relu-drelu-predictor-f32")
    runner = BACKEND.load(b.outdir, where="qemu")
    sparse = _stderr(runner, ["--prompt-ids", "1,2,3", "--steps", "4", "--print-ids"])
    dense = _stderr(BACKEND.load(b.outdir, where="qemu", dense=True), ["--prompt-ids", "1,2,3", "--steps", "4"])
    computed = float(sparse.split("FFN neurons computed ")[1].split("%")[0])
    assert 20.0 < computed < 80.0                         # threshold-0 random predictors: about half
    assert "FFN neurons computed 100.0%" in dense


@pytest.mark.parametrize("variant", ["qwen2-swiglu-dense-f32", "mistral-relu-drelu-predictor-f32",
                                     "mixtral-drelu-experts-f32"])
def test_threads_split_rows_without_changing_results(built, variant):
    b = built(variant)
    one = BACKEND.load(b.outdir, where="qemu", threads=1).logits(PROMPT, FORCED)
    three = BACKEND.load(b.outdir, where="qemu", threads=3).logits(PROMPT, FORCED)
    np.testing.assert_array_equal(one, three)     # rows and columns split; each sum keeps its order
    build_binaries(b.outdir, aarch64=False, host=False, sanitizers=("tsan",))
    probe = subprocess.run([str(b.outdir / "bin" / "tsrun-host-tsan"), "--print-isa", str(b.outdir / "weights.bin")],
                           check=False, capture_output=True, text=True)
    if "unexpected memory mapping" in probe.stderr:      # TSan vs. this kernel's ASLR settings, not our code
        pytest.skip("ThreadSanitizer cannot run on this kernel")
    tsan = BACKEND.load(b.outdir, where="host-tsan", threads=4).logits(PROMPT, FORCED)   # no data races
    np.testing.assert_allclose(tsan, one, rtol=0, atol=1e-4)


def test_text_in_text_out_and_sampling(built):
    from tokenizers import Tokenizer
    from tscompile.backends.arm64.tokenizer_bin import bytes_to_unicode
    b = built("mistral-relu-drelu-predictor-f32")
    runner = BACKEND.load(b.outdir, where="qemu")
    tok = Tokenizer.from_str(b.ir.tokenizer_json)
    to_byte = {c: i for i, c in bytes_to_unicode().items()}
    prompt = "The quick brown fox"
    greedy = runner.generate(tok.encode(prompt).ids, 6)
    text = greedy[:greedy.index(2)] if 2 in greedy else greedy        # EOS (2) ends the text
    want = b"".join(bytes(to_byte[c] for c in tok.id_to_token(i)) for i in text) + b"\n"
    assert runner.run(["--prompt", prompt, "--steps", "6"]).stdout == want
    ids = runner.generate(tok.encode("a relu dog relu brown lazy").ids, 4)   # a continuation ending in "\n"
    assert ids[-1] == tok.token_to_id("Ċ") and 2 not in ids
    text = b"".join(bytes(to_byte[c] for c in tok.id_to_token(i)) for i in ids).decode()
    assert runner.generate_text("a relu dog relu brown lazy", 4) == text and text.endswith("\n")
    a = runner.generate_text(prompt, 8, temperature=0.9, top_p=0.8, seed=7)
    assert a == runner.generate_text(prompt, 8, temperature=0.9, top_p=0.8, seed=7)   # seeded
    samples = {runner.generate_text(prompt, 8, temperature=1.5, seed=s) for s in range(4)}
    assert len(samples) > 1
    asan = BACKEND.load(b.outdir, where="host-asan")
    for temperature, top_p in ((0.7, 1.0), (1.0, 0.5), (2.0, 1e-6)):
        asan.generate_text(prompt, 12, temperature=temperature, top_p=top_p, seed=3)


def test_generation_stops_at_any_of_several_eos_ids(tmp_path):   # Llama-3 instruct: 128001 and 128009
    ir, dtype = make_variant("mistral-relu-drelu-predictor-f32")
    greedy = stepwise_greedy(ir, PROMPT, 6)
    stop = next(t for i, t in enumerate(greedy) if i >= 2 and t not in greedy[:i] and t != 2)
    ir.config.eos_token_id = [2, stop]
    BACKEND.lower(ir, BACKEND.config(dtype=dtype), tmp_path, None)
    build_binaries(tmp_path, aarch64=False)
    out = BACKEND.load(tmp_path, where="host").run(["--prompt-ids", ",".join(map(str, PROMPT)), "--steps", "6",
                                                    "--print-ids"]).stdout.decode().strip()
    assert [int(t) for t in out.split(",")] == greedy[:greedy.index(stop) + 1]


def test_manifest_describes_the_artifact(built):
    b = built("qwen2-swiglu-dense-f32")
    m = json.loads((b.outdir / "manifest.json").read_text())
    assert m == b.manifest
    assert m["dims"]["hidden"] == 64 and m["dims"]["attention_bias"] and m["dims"]["tied_embeddings"]
    assert m["isa"]["required"] == ["armv8-a", "asimd"] and "asimdhp" in m["isa"]["optional"]
    for rel in ("weights.bin", "tokenizer.bin", "src/model.h", "CMakeLists.txt", "toolchain-aarch64.cmake",
                "bin/tsrun", "bin/tsrun-host"):   # the engine records their digests (test_verify's tampering)
        assert (b.outdir / rel).is_file(), rel
    assert "qemu-aarch64 -cpu cortex-a76" in (b.outdir / "toolchain-aarch64.cmake").read_text()   # its qemu_cpu
    assert "-march=armv8-a -static -lm" in m["binaries"]["tsrun"]["flags"]     # as the cross gcc was called


def test_bad_arguments_are_one_line_errors(built):
    b = built("qwen2-swiglu-dense-f32")
    runner = BACKEND.load(b.outdir, where="host")
    for args, needle in ((["--prompt-ids", "1,999999"], "token ids below 384"),
                         (["--prompt-ids", "1,x"], "not a list of token ids"),
                         (["--prompt-ids", "1", "--steps", "-3"], "--steps"),
                         (["--prompt-ids", "1", "--bogus"], "unknown option --bogus"),
                         (["--prompt", "a", "--prompt-ids", "1"], "exclude each other")):
        with pytest.raises(UserError, match=needle):
            runner.run(args)


@needs("cmake")
def test_cmake_cross_build_runs_under_the_emulator(built, tmp_path):
    b = built("qwen2-swiglu-dense-f32")
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(b.outdir), "-B", str(build),
                    f"-DCMAKE_TOOLCHAIN_FILE={b.outdir / 'toolchain-aarch64.cmake'}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True)
    res = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], check=False, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout[-2000:]
    assert "1 tests passed" in res.stdout or "100% tests passed" in res.stdout


def test_runner_contract_extras(built, tmp_path):
    b = built("qwen2-swiglu-dense-f32")
    assert BACKEND.available() is None
    runner = BACKEND.load(b.outdir)
    assert runner.prefill == "stepwise"
    assert runner.decode_tokens_per_second(PROMPT[:2], 4) > 0          # host build timing, never qemu's
    assert runner.logits(PROMPT, []).shape == (1, b.ir.config.vocab_size)
    assert runner.generate(PROMPT, 0) == []
    with pytest.raises(UserError, match="not found"):
        BACKEND.load(b.outdir / "missing")
    # a damaged manifest: one line naming it
    for text, needle in (("{", r"manifest.json: unreadable \("), ("[]", "manifest.json: not a JSON object"),
                         ("{}", r"manifest.json: no 'dims' \(not a manifest of the arm64")):
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(UserError, match=needle):
            BACKEND.load(tmp_path)
