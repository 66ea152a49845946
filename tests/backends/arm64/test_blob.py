"""Hostile weights.bin files: every one is refused with a one-line error (exit 2), never a crash.

Run on the host build, the ASan+UBSan host build, and (a sample) the aarch64 build under qemu.
"""
from __future__ import annotations

import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from arm64_cases import needs
from tscompile.backends.arm64.blob import FFN_SPEC_BYTES, FIXED_HEADER, N_DIMS, TENSOR_ENTRY_BYTES
from tscompile.backends.arm64.build import qemu_command

VARIANT = "mistral-relu-drelu-predictor-f32"


def header_layout(blob: bytes) -> tuple[int, int, int]:
    """(header_size, n_tensors, offset of the tensor table)."""
    header_size, n_tensors = struct.unpack_from("<II", blob, 12)
    n_layers, n_experts = struct.unpack_from("<i", blob, 24 + 4 * 3)[0], struct.unpack_from("<i", blob, 24 + 4 * 12)[0]
    return header_size, n_tensors, FIXED_HEADER + FFN_SPEC_BYTES * n_layers * max(1, n_experts)


def patched(blob: bytes, fmt: str, offset: int, value) -> bytes:
    """blob with one field changed and the header checksum recomputed (over the original header's extent),
    so the change has to be caught by the field checks themselves."""
    header_size = struct.unpack_from("<I", blob, 12)[0]
    b = bytearray(blob)
    struct.pack_into(fmt, b, offset, value)
    struct.pack_into("<I", b, header_size - 4, zlib.crc32(bytes(b[:header_size - 4])))
    return bytes(b)


def hostile_blobs(blob: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, text the error must contain)."""
    header_size, n_tensors, table = header_layout(blob)
    entries = [struct.unpack_from("<48sIIIIQQ", blob, table + i * TENSOR_ENTRY_BYTES) for i in range(n_tensors)]
    cases: dict[str, tuple[bytes, str]] = {}
    cuts = {0, 1, 7, 8, 12, 79, 80, 81, header_size // 2, header_size - 4, header_size - 1, header_size,
            len(blob) - 1, len(blob) // 2}
    for _, _, _, _, _, off, nbytes in entries:
        cuts |= {off, off + 1, off + nbytes - 1}
    for cut in sorted(c for c in cuts if c < len(blob)):
        cases[f"truncated at {cut}"] = (blob[:cut], "")
    for pos in range(0, header_size, max(1, header_size // 40)):
        b = bytearray(blob)
        b[pos] ^= 0x5A
        cases[f"header byte {pos} flipped"] = (bytes(b), "")
    for i, (name, *_rest, off, nbytes) in enumerate(entries):
        b = bytearray(blob)
        b[off + nbytes // 2] ^= 0x01
        cases[f"data of {name.rstrip(bytes(1)).decode()} flipped"] = (bytes(b), "checksum mismatch")
    dims = {"vocab": 0, "dim": 1, "hidden_dim": 2, "n_layers": 3, "n_heads": 4, "head_dim": 6}
    for dim, k in dims.items():
        for value in (0, -1, 2**31 - 1, 65536):
            cases[f"{dim} = {value}"] = (patched(blob, "<i", 24 + 4 * k, value), "")
    e0 = table + TENSOR_ENTRY_BYTES * 3          # an attention matrix's entry
    absurd = {
        "magic": (patched(blob, "<8s", 0, b"GGUF\0\0\0\0"), "bad magic"),
        "version 99": (patched(blob, "<I", 8, 99), "version"),
        "header_size huge": (patched(blob, "<I", 12, 2**32 - 1), ""),
        "n_tensors huge": (patched(blob, "<I", 16, 2**31), ""),
        "dtype 7": (patched(blob, "<I", 20, 7), "dtype"),
        "rms_eps": (patched(blob, "<f", 24 + 4 * N_DIMS, 0.5), "rms_eps"),
        "layer activation": (patched(blob, "<i", FIXED_HEADER,
                                     (struct.unpack_from("<i", blob, FIXED_HEADER)[0] + 1) % 4), "sparsity spec"),
        "predictor rank huge": (patched(blob, "<i", FIXED_HEADER + 8, 2**30), "sparsity spec"),
        "tensor renamed": (patched(blob, "<48s", e0, b"layers.0.evil"), "expected"),
        "tensor name unterminated": (patched(blob, "<48s", e0, b"x" * 48), "expected"),
        "rows huge": (patched(blob, "<I", e0 + 52, 2**32 - 1), "shape"),
        "offset past the end": (patched(blob, "<Q", e0 + 64, 2**63), "outside"),
        "offset misaligned": (patched(blob, "<Q", e0 + 64, entries[3][5] + 4), "aligned"),
        "offset inside the header": (patched(blob, "<Q", e0 + 64, 0), "outside"),
        "nbytes huge": (patched(blob, "<Q", e0 + 72, 2**64 - 64), "bytes"),
        "nbytes wraps offset": (patched(patched(blob, "<Q", e0 + 72, 2**64 - 64), "<Q", e0 + 64, 128), ""),
        "empty file": (b"", ""),
    }
    cases.update(absurd)
    return cases


def run_blob(cmd: list[str], path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd + [str(path), "--prompt-ids", "1,2", "--steps", "1", "--print-ids"], check=False,
                          capture_output=True, text=True, timeout=60)


def check_rejected(res: subprocess.CompletedProcess, needle: str, what: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, f"{what}: exit {res.returncode}, stderr {res.stderr[-500:]}"
    assert len(lines) == 1 and lines[0].startswith("tsrun: "), f"{what}: {res.stderr[-500:]}"
    assert needle in lines[0], f"{what}: {lines[0]!r} lacks {needle!r}"
    assert res.stdout == ""


@pytest.fixture(scope="module")
def blob_cases(built, tmp_path_factory):
    b = built(VARIANT)
    blob = (b.outdir / "weights.bin").read_bytes()
    d = tmp_path_factory.mktemp("hostile")
    cases = {}
    for i, (name, (data, needle)) in enumerate(hostile_blobs(blob).items()):
        path = d / f"case{i}.bin"
        path.write_bytes(data)
        cases[name] = (path, needle)
    return b, cases


@pytest.mark.parametrize("binary", ["tsrun-host", "tsrun-host-asan"])
def test_hostile_blobs_are_refused_on_the_host(blob_cases, binary):
    b, cases = blob_cases
    assert len(cases) > 80
    cmd = [str(b.outdir / "bin" / binary)]
    for name, (path, needle) in cases.items():
        check_rejected(run_blob(cmd, path), needle, name)
    assert run_blob(cmd, b.outdir / "weights.bin").returncode == 0      # the intact blob still loads


@needs("qemu-aarch64")
def test_hostile_blobs_are_refused_on_aarch64(blob_cases):
    b, cases = blob_cases
    cmd = qemu_command("cortex-a76") + [str(b.outdir / "bin" / "tsrun")]
    sample = list(cases.items())[::5]
    for name, (path, needle) in sample:
        check_rejected(run_blob(cmd, path), needle, name)


def test_corrupt_tokenizer_is_refused(built, tmp_path):
    b = built(VARIANT)
    data = (b.outdir / "tokenizer.bin").read_bytes()
    host = str(b.outdir / "bin" / "tsrun-host-asan")
    for name, bad in {"truncated": data[:len(data) // 3], "flipped": data[:40] + bytes([data[40] ^ 1]) + data[41:],
                      "empty": b"", "short": data[:10]}.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(bad)
        res = subprocess.run([host, str(b.outdir / "weights.bin"), "--tokenizer", str(path), "--prompt", "hi"],
                             check=False, capture_output=True, text=True)
        check_rejected(res, "", f"tokenizer {name}")


def test_moe_blob_fields_are_checked(built, tmp_path):
    """Expert count, top-k, per-expert specs and expert tensors are checked like the rest."""
    b = built("mixtral-drelu-experts-f32")
    blob = (b.outdir / "weights.bin").read_bytes()
    header_size, n_tensors, table = header_layout(blob)
    names = [struct.unpack_from("<48s", blob, table + i * TENSOR_ENTRY_BYTES)[0].rstrip(b"\0").decode()
             for i in range(n_tensors)]
    assert names[names.index("layers.0.ffn_norm") + 1:][:4] == [
        "layers.0.router", "layers.0.experts.0.w_gate", "layers.0.experts.0.w_up", "layers.0.experts.0.w_down_t"]
    assert "layers.0.experts.3.pred_fc1" not in names and "layers.1.experts.3.pred_fc2" in names   # dense expert
    router = names.index("layers.1.router")
    _, dtype, rows, cols, _, off, nbytes = struct.unpack_from("<48sIIIIQQ", blob, table + router * TENSOR_ENTRY_BYTES)
    flipped = bytearray(blob)
    flipped[off + nbytes // 2] ^= 1
    spec_of_l1_e2 = FIXED_HEADER + FFN_SPEC_BYTES * (4 + 2)
    cases = {"n_experts": (patched(blob, "<i", 24 + 4 * 12, 8), "n_experts is 8, this build was compiled for 4"),
             "top_k": (patched(blob, "<i", 24 + 4 * 13, 1), "top_k is 1"),
             "expert spec": (patched(blob, "<f", spec_of_l1_e2 + 16, 0.5), "layers.1.experts.2: FFN sparsity spec"),
             "router data": (bytes(flipped), "tensor layers.1.router: checksum mismatch")}
    assert (dtype, rows, cols) == (0, 4, 64)            # float32 [N_EXPERTS, DIM]
    for name, (data, needle) in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(data)
        check_rejected(run_blob([str(b.outdir / "bin" / "tsrun-host-asan")], path), needle, name)


def test_a_weight_beyond_float16_is_refused_naming_it(tmp_path):
    """It became inf in weights.bin, and tsrun's logits NaN, with nothing said at lowering."""
    from tscompile.backends.arm64 import BACKEND

    from tscompile.errors import UserError
    from tscompile.tiny import make_tiny_ir
    ir = make_tiny_ir("llama", "swiglu", seed=1)
    ir.weights["model.layers.0.mlp.up_proj.weight"][3, 5] = 1e5
    with pytest.raises(UserError, match=r"^arm64: tensor model\.layers\.0\.mlp\.up_proj\.weight holds 100000, "
                                        r"beyond float16's range \(65504\); use dtype float32 for this target$"):
        BACKEND.lower(ir, BACKEND.config(dtype="float16", compile=False), tmp_path / "arm64", None)
    assert not (tmp_path / "arm64" / "weights.bin").exists()


def test_sources_only_say_they_cannot_run_and_qemu_cpu_is_a_name(tmp_path):
    """Verify reports the artifact as not verified (it failed the build on a missing binary); the cpu name is
    written into the CMake toolchain file, so nothing else may pass."""
    from pydantic import ValidationError

    from tscompile.backends.arm64 import BACKEND
    from tscompile.tiny import make_tiny_ir
    manifest = BACKEND.lower(make_tiny_ir("llama", "swiglu", seed=1), BACKEND.config(compile=False), tmp_path, None)
    assert manifest["cannot_run"] == "lowered with compile: false (sources only, no binaries)"
    BACKEND.config(qemu_cpu="cortex-a53")
    with pytest.raises(ValidationError):
        BACKEND.config(qemu_cpu='cortex-a76)\nmessage(FATAL_ERROR "x")\n#')
