"""The arm64 target's options (spec: `targets: {arm64: {...}}`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tscompile.api import PassConfig


class Arm64Config(PassConfig):
    dtype: Literal["float32", "float16"] = "float32"   # matrices; norms, biases, predictors stay float32
    compile: bool = True            # build bin/tsrun (when a cross compiler is present) and bin/tsrun-host
    threads: int = Field(1, ge=1, le=256)   # --threads the Runner passes
    # -cpu for qemu-aarch64 on non-arm64 hosts (cortex-a53: no fp16 arithmetic); also written into the CMake
    # toolchain file, so a name only
    qemu_cpu: str = Field("cortex-a76", pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
