"""Compiling the generated sources: the aarch64 binary (cross gcc or the Android NDK's clang) and the host one.

The compiler is called directly (two or three processes, run side by side) so lowering a tiny model
takes a couple of seconds; CMakeLists.txt describes the same build for users.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tscompile.cache import compiler_version
from tscompile.errors import UserError

from .sources import FP16_ARITH_FILE, NEON_FILES, SOURCES

CROSS_GCC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
QEMU_SYSROOT = "/usr/aarch64-linux-gnu"
COMMON_FLAGS = ["-std=c11", "-O2", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror"]
LIBS = ["-lm", "-lpthread"]
SANITIZERS = {"asan": "address,undefined", "tsan": "thread"}   # binary suffix -> -fsanitize=


def is_arm64_host() -> bool:
    return platform.machine() in ("aarch64", "arm64")


def android_ndk() -> str | None:
    for var in ("ANDROID_NDK", "ANDROID_NDK_HOME"):
        if os.environ.get(var) and Path(os.environ[var]).is_dir():
            return os.environ[var]
    return None


def cross_compiler() -> list[str] | None:
    """The aarch64 compiler command: NDK clang, native cc on arm64 hosts, else Debian's cross gcc."""
    ndk = android_ndk()
    if ndk:
        clang = Path(ndk) / "toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android28-clang"
        if clang.exists():
            return [str(clang)]
    if is_arm64_host() and shutil.which("cc"):
        return ["cc"]
    gcc = shutil.which(CROSS_GCC)
    return [gcc] if gcc else None


def host_compiler() -> list[str] | None:
    cc = shutil.which("gcc") or shutil.which("cc")
    return [cc] if cc else None


@dataclass
class Job:
    what: str
    commands: list[list[str]]     # run one after another


def aarch64_job(cc: list[str], src: Path, out: Path, extra_sources: tuple[Path, ...] = (),
                skip: tuple[str, ...] = ()) -> Job:
    """Compiles kernels_neon_fp16.c with +fp16, everything else for plain ARMv8-A, and links.

    Cross builds with Debian's gcc are static: they run on any aarch64 Linux (and under qemu without a
    sysroot), and the qemu plugin sees libc's symbols.
    """
    c_files = [str(src / n) for n in SOURCES if n.endswith(".c") and n != FP16_ARITH_FILE and n not in skip]
    fp16_obj = out.with_name(out.name + "-fp16.o")
    libs = ["-lm"] if android_ndk() else LIBS                                # bionic has pthreads in libc
    static = ["-static"] if Path(cc[0]).name == CROSS_GCC else []             # the cross sysroot has libc.a
    return Job(f"aarch64 build of {out.name}", [
        cc + COMMON_FLAGS + ["-march=armv8.2-a+fp16", "-c", str(src / FP16_ARITH_FILE), "-o", str(fp16_obj)],
        cc + COMMON_FLAGS + ["-march=armv8-a", "-I", str(src)] + static + c_files + [str(p) for p in extra_sources] +
        [str(fp16_obj), "-o", str(out)] + libs,
        ["rm", "-f", str(fp16_obj)],
    ])


def host_job(cc: list[str], src: Path, out: Path, sanitizer: str | None = None,
             extra_sources: tuple[Path, ...] = (), skip: tuple[str, ...] = ()) -> Job:
    """The portable build (scalar kernels) for the machine we run on; sanitizer: a SANITIZERS key."""
    c_files = [str(src / n) for n in SOURCES if n.endswith(".c") and n not in NEON_FILES and n not in skip]
    flags = COMMON_FLAGS + ["-I", str(src)]
    if sanitizer:
        flags += [f"-fsanitize={SANITIZERS[sanitizer]}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
    return Job(f"host build of {out.name}",
               [cc + flags + c_files + [str(p) for p in extra_sources] + ["-o", str(out)] + LIBS])


def run_jobs(jobs: list[Job]) -> None:
    """Runs the jobs side by side (each job's commands in order); UserError naming every failure."""
    def start(cmd):
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    active = [(job, iter(job.commands[1:]), start(job.commands[0])) for job in jobs]
    errors = []
    while active:
        job, rest, proc = active.pop(0)
        out, _ = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"{job.what} failed: " + " | ".join(out.decode(errors="replace").strip().splitlines()[:3]))
            continue
        nxt = next(rest, None)
        if nxt is not None:
            active.append((job, rest, start(nxt)))
    if errors:
        raise UserError("; ".join(errors))


def build_binaries(outdir: Path, *, aarch64: bool = True, host: bool = True,
                   sanitizers: tuple[str, ...] = ()) -> dict:
    """Compiles outdir/src into outdir/bin: tsrun (aarch64), tsrun-host, tsrun-host-asan / -tsan (sanitizers)."""
    src, bin_dir = outdir / "src", outdir / "bin"
    bin_dir.mkdir(exist_ok=True)
    jobs, built = [], {}
    cc = cross_compiler() if aarch64 else None
    if cc:
        job = aarch64_job(cc, src, bin_dir / "tsrun")
        jobs.append(job)
        link = [f for f in job.commands[1][len(cc):] if f.startswith("-") and f not in ("-o", "-I")]
        built["tsrun"] = {"compiler": compiler_version(cc),
                          "flags": " ".join(link) + " (+fp16 for kernels_neon_fp16.c)"}
    hcc = host_compiler() if host or sanitizers else None
    if hcc and host and not is_arm64_host():
        jobs.append(host_job(hcc, src, bin_dir / "tsrun-host"))
        built["tsrun-host"] = {"compiler": compiler_version(hcc), "flags": "-O2 (scalar kernels)"}
    for name in sanitizers if hcc else ():
        jobs.append(host_job(hcc, src, bin_dir / f"tsrun-host-{name}", sanitizer=name))
        built[f"tsrun-host-{name}"] = {"compiler": compiler_version(hcc), "flags": f"-O2 -fsanitize={SANITIZERS[name]}"}
    run_jobs(jobs)
    return built


def qemu_command(cpu: str = "cortex-a76") -> list[str] | None:
    """How to run the aarch64 binary here: nothing on arm64 hosts, qemu-aarch64 elsewhere (None if missing)."""
    if is_arm64_host():
        return []
    qemu = shutil.which(QEMU)
    return [qemu, "-cpu", cpu, "-L", QEMU_SYSROOT] if qemu else None
