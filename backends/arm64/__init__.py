"""arm64 backend: a standalone, dependency-free C runtime (tsrun) generated from Jinja templates.

`--target arm64` writes arm64/: src/ (C11 sources), CMakeLists.txt, toolchain-aarch64.cmake, weights.bin,
tokenizer.bin, manifest.json, and bin/tsrun (aarch64) + bin/tsrun-host (x86_64, scalar kernels).
"""
from __future__ import annotations

from tscompile.api import BackendInfo

from .build import cross_compiler, host_compiler, is_arm64_host, qemu_command
from .config import Arm64Config
from .lower import lower_arm64
from .runner import load_arm64


def arm64_available() -> str | None:
    """None when artifacts can be built and run here; else why not."""
    if host_compiler() is None and not is_arm64_host():
        return "no C compiler (gcc) for the host build"
    if cross_compiler() is None:
        return "no aarch64 compiler: apt-get install gcc-aarch64-linux-gnu (or set ANDROID_NDK)"
    if qemu_command() is None:
        return "no qemu-aarch64 to run the aarch64 binary: apt-get install qemu-user"
    return None


def arm64_toolchain() -> str:
    cc, host = cross_compiler(), host_compiler()
    return f"aarch64 cc: {' '.join(cc) if cc else 'none'}; host cc: {' '.join(host) if host else 'none'}"


BACKEND = BackendInfo(
    name="arm64",
    # 2: weights.bin v2 (experts); 3: the tensor table fits every tensor; 4: no tokenizer.bin for added tokens
    # that strip spaces; 5: generation stops at any of the EOS ids
    version="5",
    doc="standalone C runtime (NEON fp32/fp16, sparse FFN and MoE experts), cross-compiled for aarch64, run under qemu "
        "off-device",
    config=Arm64Config,
    lower=lower_arm64,
    load=load_arm64,
    available=arm64_available,
    toolchain=arm64_toolchain,
)
