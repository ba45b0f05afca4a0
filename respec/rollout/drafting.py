"""The drafter contract the rollout engine speaks (implementations live in respec/drafter/).

A drafter proposes k tokens per active row per speculative round. It keeps its own small KV cache
whose committed length per row the engine stores (`draft_len`) and hands back each round: the
drafter consumes every entry it has true data for (catch-up, ragged across rows, one forward),
then drafts k tokens autoregressively, and reports `committed_len`, the entries computed from true
data. Entries written by the draft steps themselves lie past that length and are rolled back by
the engine's length write, exactly like the target's rejected slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .sampling import SamplingParams


@dataclass
class DraftContext:
    """The engine's view of the B active rows (cache slots [0, B)) at the start of a round."""

    tokens: torch.Tensor  # (S, T) long: prompt + generated tokens per slot; the pending token sits at target_len
    features: torch.Tensor | None  # (S, T, F) target features at committed positions (None if not captured)
    target_len: torch.Tensor  # (B,) long: committed target cache length L; pending token at position L
    draft_len: torch.Tensor  # (B,) long: drafter entries already computed from true data


@dataclass
class Proposal:
    tokens: torch.Tensor  # (B, k) long: drafted tokens for positions L+1 .. L+k
    probs: torch.Tensor  # (B, k, V) float32: transformed draft distributions the tokens were sampled from
    ok: torch.Tensor  # (B,) bool: False where the drafter produced non-finite logits (row falls back to plain)
    committed_len: torch.Tensor  # (B,) long: the drafter's new true-data length (its draft entries lie past it)


class Drafter(Protocol):
    feature_layers: tuple[int, ...]  # target layers whose outputs it consumes (empty: tokens only)

    def allocate(self, max_rows: int, max_len: int) -> None: ...

    def propose(
        self, ctx: DraftContext, k: int, sampling: SamplingParams, u_draft: torch.Tensor
    ) -> Proposal: ...

    def move_rows(self, src: list[int], dst: list[int]) -> None: ...
