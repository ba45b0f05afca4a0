"""`Linear`: nn.Linear whose CPU inference path uses weights laid out once for the kernel that runs them.

Why: PyTorch's CPU `F.linear` calls MKL's sgemm, which re-packs the weight into its blocked layout
on every call and, for 2 <= M < ~16 rows, takes a slow small-gemm path (measured on the 2-core
AMD EPYC VM: a 256 -> 1536 projection costs ~100 us for 2-8 rows vs ~40 us for 1 row). Decoding
multiplies the same weights by a few rows thousands of times, so packing each weight once into
oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, the kernel inductor's CPU
freezing path uses) and calling `torch.ops.mkldnn._linear_pointwise` makes verify passes (k + 1
rows per sequence) and batched decode steps 1.2-2x cheaper per matmul. `benchmarks/results/decode.md`
and `rollout.md` show the end-to-end effect; `respec bench decode` measures it against transformers.

When the packed path runs (all must hold; otherwise this is exactly nn.Linear):
  * CPU, fp32 or bf16 (where the CPU has native bf16 dot products), autograd off (`torch.no_grad()`:
    the engine and every teacher-forced scoring pass). Training forwards keep nn.Linear, so
    gradients are untouched.
  * oneDNN passed the import-time probe (`_available`) and `RESPEC_PACKED_LINEAR` is not "0".
  * At least `MIN_ROWS` input rows: for one row MKL's gemv is as fast or faster for the small
    matrices, so single-row decode keeps it (on the transposed weight, below). The choice depends on
    the input shape only, never on timings, so runs stay reproducible.
  * The weight has at least `MIN_WEIGHT_NUMEL` entries (a 29-token LM head is faster unpacked).
  * The weight was not created under `torch.inference_mode()` (such tensors have no version
    counter, so a packed copy could not be checked for staleness).

One row in fp32 (batch-1 decoding, the tail of a rollout) takes a third path under the same
conditions: `x @ W^T` on a weight stored transposed (in, out) once, instead of F.linear's gemv on the
(out, in) rows. Measured on the built-in actor at batch 1 (interleaved, median of 9 x 100 forwards):
a whole cached forward 3.17 ms against 4.10 ms, logits within 1e-6. bf16 gained 6% and stays on
F.linear.

Staleness is impossible by construction: every derived copy (packed or transposed) records the
weight's storage pointer and autograd version counter (bumped by every in-place write: optimizer
steps, `load_state_dict`, `copy_`), and is rebuilt on the next call after any change. This is the
actor-side twin of a stale drafter; tests/rl/test_trainer.py's engine-vs-trainer log-prob tests
fail without the check.

Numerics: oneDNN accumulates in a different order than MKL, so outputs differ at float rounding
level (~3e-6 relative in fp32); the logit-parity and log-prob-gap tests bound the end-to-end effect.
The derived copies live in a side table keyed by the weight's identity and the layout, not in the
module: state_dict, deepcopy, pickling and `.to()` never see them, and they die with their weight.
Each layout in use costs one extra copy of the weight in memory.
"""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 2
MIN_WEIGHT_NUMEL = 1 << 16
PACK_HINT_ROWS = 64  # oneDNN's layout hint: measured best or tied for 2..384 rows here


def _available() -> bool:
    """oneDNN's packed linear is present and gives F.linear's result on a small probe (some builds,
    e.g. other CPU architectures, lack the ops or fail in them: those keep nn.Linear)."""
    if os.environ.get("RESPEC_PACKED_LINEAR", "1") == "0":
        return False
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight")):
        return False
    try:
        with torch.no_grad():
            w, x = torch.linspace(-1, 1, 96).view(12, 8), torch.linspace(0, 1, 24).view(3, 8)
            got = ops._linear_pointwise(x, ops._reorder_linear_weight(w, PACK_HINT_ROWS), None, "none", [], "")
            return bool(torch.allclose(got, F.linear(x, w), atol=1e-5))
    except Exception:  # noqa: BLE001 - any failure means: do not use it
        return False


def _bf16_native() -> bool:
    """The CPU has native bf16 dot products (else oneDNN's bf16 is a slow reference path)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_ENABLED = _available()
_BF16 = _ENABLED and _bf16_native()
# (id(weight), layout) -> (storage pointer, version counter, dtype, derived weight); an entry is
# dropped when its weight is garbage-collected (tensors compare elementwise, so they cannot be keys)
_DERIVED: dict[tuple[int, str], tuple] = {}
_LAYOUTS = {
    "packed": lambda w: torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_HINT_ROWS),
    "transposed": lambda w: w.t().contiguous(),
}


def _derived(weight: torch.Tensor, layout: str) -> torch.Tensor:
    key = (weight.data_ptr(), weight._version, weight.dtype)
    slot = (id(weight), layout)
    entry = _DERIVED.get(slot)
    if entry is None:
        weakref.finalize(weight, _DERIVED.pop, slot, None)
    if entry is None or entry[:3] != key:
        entry = (*key, _LAYOUTS[layout](weight.detach()))
        _DERIVED[slot] = entry
    return entry[3]


def path(x: torch.Tensor, weight: torch.Tensor) -> str:
    """Which path `Linear` takes for input x: "packed", "transposed" or "plain" (module docstring)."""
    eligible = (
        _ENABLED
        and x.device.type == "cpu"
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _BF16))
        and x.dtype == weight.dtype
        and weight.numel() >= MIN_WEIGHT_NUMEL
        and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
        and not weight.is_inference()  # made under torch.inference_mode: no version counter to check
    )
    if not eligible:
        return "plain"
    if x.numel() >= MIN_ROWS * x.shape[-1]:
        return "packed"
    return "transposed" if x.dtype == torch.float32 else "plain"


def uses_packed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `Linear` runs input x on the oneDNN-packed weight."""
    return path(x, weight) == "packed"


@contextmanager
def packed_off():
    """Run the block with plain F.linear everywhere (the decode benchmark's unpacked arm)."""
    global _ENABLED
    enabled, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = enabled


def kernel_tag(device: torch.device | str) -> str:
    """Which matmul path inference uses on `device`: part of the cost profile's cache key, so a profile
    measured with one path is never reused with the other."""
    if torch.device(device).type != "cpu" or not _ENABLED:
        return "default"
    return f"onednn-packed(rows>={MIN_ROWS},numel>={MIN_WEIGHT_NUMEL},hint={PACK_HINT_ROWS},bf16={_BF16})+1row-transposed"


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict) with the packed CPU inference path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        way = path(x, self.weight)
        if way == "plain":
            return F.linear(x, self.weight, self.bias)
        bias = self.bias.detach() if self.bias is not None else None
        if way == "packed":
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), _derived(self.weight, "packed"), bias, "none", [], "")
        y = x @ _derived(self.weight, "transposed")
        return y if bias is None else y + bias
