"""Shared pieces of the drafter implementations.

The contract itself (DraftContext, Proposal, Drafter) lives with the engine in
respec/rollout/drafting.py and is re-exported here. Two implementations share it:
  * `EagleDrafter` (eagle.py): an EAGLE-3 head over the target's low/mid/high hidden features;
  * `DraftModelDrafter` (draft_lm.py): a standalone small LM with the same tokenizer (classic
    two-model speculative decoding).
"""

from __future__ import annotations

import torch

from ..rollout.drafting import DraftContext, Drafter, Proposal
from ..rollout.sampling import SamplingParams

__all__ = ["DraftContext", "Drafter", "Proposal", "sample_drafts_step"]


def sample_drafts_step(logits: torch.Tensor, sampling: SamplingParams, u: torch.Tensor):
    """One draft step for (B, V) logits: (tokens (B,), probs (B, V) fp32, ok (B,) bool).

    Rows with non-finite logits are replaced by zeros (a uniform draft) and flagged, so the engine
    verifies nothing from them this round and the output stays exact.
    """
    from ..rollout.sampling import sample, transform

    ok = torch.isfinite(logits).all(dim=-1)  # (B,)
    logits = torch.where(ok[:, None], logits, torch.zeros_like(logits))
    probs = transform(logits.float(), sampling, validate=False).probs  # (B, V): non-finite rows replaced above
    return sample(probs, u), probs, ok
