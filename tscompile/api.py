"""The plug-in contracts: what a pass and a backend are. Third parties implement exactly these.

A pass (torchao style) is a typed config class kept apart from the function that applies it:

    class DReLUConfig(PassConfig):
        kind: Literal["drelu", "relu"] = "drelu"

    def apply_drelu(ir: ModelIR, cfg: DReLUConfig, ctx: Context) -> ModelIR: ...

    PASS = PassInfo(name="drelu", version="1", doc="...", config=DReLUConfig, run=apply_drelu)

and is registered under the entry-point group `tscompile.passes` (`drelu = "pkg.module:PASS"`).
A backend is a BackendInfo registered under `tscompile.backends`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from pydantic import BaseModel, ConfigDict


class PassConfig(BaseModel):
    """Base of every pass and target config: unknown keys are errors; so are NaN and infinities (a resolved spec
    could not write them back: JSON has no NaN)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    def data_sections(self, declared: tuple[str, ...]) -> tuple[str, ...]:
        """Which of the spec.data sections its pass declares this config reads (a config may need fewer)."""
        return declared

    def spec_errors(self, spec: Any) -> list[tuple[tuple, str]]:
        """(key path under this config, message) for what is wrong only together with the rest of the spec (its
        data sections are there by then); the build stops at plan time on the first."""
        return []


@dataclass
class Context:
    """What a pass or backend gets besides the IR."""
    spec: Any                      # the validated Spec
    build_dir: Path                # build/<name>/
    work_dir: Path                 # scratch kept across runs of this step (resumable checkpoints)
    device: str = "cpu"            # "cuda" when a GPU is present and the step may use it
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("tscompile"))
    source_ir: Any = None          # the dense source model (teacher for distillation, baselines)
    seed: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassInfo:
    name: str
    version: str                   # bump when outputs change: part of the cache key
    doc: str                       # one line
    config: type[PassConfig]
    run: Callable[..., Any]        # (ir, cfg, ctx) -> ir
    needs_data: bool | tuple[str, ...] = False   # spec.data sections it reads ("train", "calib"); True: unsaid
    gpu: str = "no"                # no | optional | required
    requires: tuple[str, ...] = () # passes that must come earlier in the pipeline


class Runner(Protocol):
    """A loaded artifact. Token ids in, float32 logits out; the verifier drives every backend through this."""
    prefill: str                   # "batched" (prompt in one exact forward) or "stepwise" (token by token)

    def logits(self, prompt_ids: list[int], forced_ids: list[int]) -> Any:
        """Logits [1 + len(forced_ids), vocab]: after the prompt, then after each teacher-forced token."""

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation (temperature 0), stopping at max_new_tokens only."""

    def decode_tokens_per_second(self, prompt_ids: list[int], n_tokens: int) -> float:
        """Decode speed after a prefill of prompt_ids, timed over n_tokens single-token steps. A runner that
        times something other than the artifact itself says what in an attribute `speed_measured_on`."""


@dataclass(frozen=True)
class BackendInfo:
    name: str
    version: str
    doc: str
    config: type[PassConfig]
    # (ir, cfg, outdir: Path, ctx) -> manifest dict; writes outdir. A manifest's "cannot_run" (a reason) marks an
    # artifact that runs nowhere as lowered (arm64 sources without binaries): verify reports it, generate refuses it
    lower: Callable[..., dict]
    load: Callable[..., Runner]    # (outdir: Path, dense: bool = False, **opts) -> Runner
    available: Callable[[], str | None] = lambda: None   # None, or why this machine cannot run artifacts
    # the optional tools lower() would use here, e.g. "aarch64 cc: none": part of the target's cache key, so an
    # artifact lowered without a compiler is lowered again once there is one
    toolchain: Callable[[], str] = lambda: ""
