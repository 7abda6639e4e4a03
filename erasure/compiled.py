"""A denoiser's repeated calls in a training step, compiled by torch.compile (AdvUnlearn's `compile_unet`)."""

from __future__ import annotations

import torch

from pipelines.errors import InputError

COMPILE_CHOICES = ("none", "cudagraphs", "reduce-overhead", "inductor", "aot_eager")
_CUDA_GRAPHS = ("cudagraphs", "reduce-overhead")


class StepDenoiser:
    """`family.denoise(unet, x_t, t, cond)` for the calls a training step repeats with the same shapes, compiled
    by torch.compile as `choice` says ("none": as is).

    A small model's step on a GPU is bound by kernel launches, not arithmetic. `cudagraphs` traces each shape's
    forward and backward once (seconds) and replays their kernels as one CUDA graph; that backend takes the
    weights for inputs, so each graph holds a copy of them and each replay refreshes it: for a small model only.
    `reduce-overhead` (inductor's fused kernels in CUDA graphs, weights in place) and `inductor` compile for
    minutes (on a CPU more than a digits run's calls win back, `benchmarks/compile_speed.py`); `aot_eager`
    traces without changing a kernel, the check that a family's denoiser compiles as one graph. `close()` when
    done: the graphs stay cached in the process otherwise, and a UNet on xformers stays on SDPA.
    """

    def __init__(self, family, unet, choice: str, device: torch.device):
        if choice not in COMPILE_CHOICES:
            raise InputError(f"unknown compile choice {choice!r}; choose one of: {', '.join(COMPILE_CHOICES)}")
        if choice in _CUDA_GRAPHS and device.type != "cuda":
            raise InputError(f"compile_unet={choice} needs a CUDA device (this run is on {device.type})")
        self.choice = choice

        def denoise(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            return family.denoise(unet, x_t, t, cond)

        self._code, self._unet, self._processors = denoise.__code__, unet, None
        if choice == "none":
            self._call = denoise
            return
        self._processors = _attention_without_xformers(unet)  # xformers' kernels are opaque to the tracer
        how = {"mode": choice} if choice == "reduce-overhead" else {"backend": choice}
        self._call = torch.compile(denoise, fullgraph=True, dynamic=False, **how)
        self._skips_before = self._skips()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._call(x_t, t, cond)

    def new_step(self) -> None:
        """Declare every earlier call's outputs dead and its backward pass done. A CUDA graph's replay reuses its
        outputs' memory; without the mark a second call of a shape records a second graph beside the first."""
        if self.choice in _CUDA_GRAPHS:
            torch.compiler.cudagraph_mark_step_begin()

    def close(self) -> None:
        """Drop the compiled graphs and the CUDA graphs' memory. Every run's `denoise` shares one code object, so
        runs in one process (the preview, a benchmark) would add to one cache, which `fullgraph` turns into an
        error at its recompile limit (8); the trees' step marks would also reach other compiled models."""
        if self.choice == "none":
            return
        if self._processors is not None:  # the UNet's own attention back, for what the process does next
            self._unet.set_attn_processor(self._processors)
        torch._dynamo.reset_code(self._code)
        if self.choice in _CUDA_GRAPHS:
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()

    @staticmethod
    def _skips() -> int:
        from torch._dynamo.utils import counters

        return counters["inductor"]["cudagraph_skips"]

    def record(self) -> dict:
        """What `erasure.json` keeps of the compiling: the choice and, with CUDA graphs, how many of the graphs
        compiled in this process since the run began fell back to launching kernels one by one."""
        if self.choice not in _CUDA_GRAPHS:
            return {"choice": self.choice}
        return {"choice": self.choice, "cudagraph_skips": self._skips() - self._skips_before}


def _attention_without_xformers(unet) -> dict | None:
    """A UNet that the loader gave xformers' attention (the `gpu` extra) on PyTorch's SDPA instead, which is as fast
    and which the tracer sees through; returns the processors it had (None: nothing changed)."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        return None
    processors = unet.attn_processors
    if not any("XFormers" in type(processor).__name__ for processor in processors.values()):
        return None
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    return processors
