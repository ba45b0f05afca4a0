"""Rollouts -> padded training tensors, and the trainer's log-probs of the emitted tokens.

The log-probs the loss differentiates come from `sampling.logprobs_of`, the engine's own
transform, with the engine's recorded nucleus sizes, so the ratio new/old is taken against exactly
the distribution each token was sampled from (temperature, top-k, top-p).

Nucleus guard. A recorded nucleus of size n keeps the n highest-ranked tokens of the *trainer's*
logits. Training logits come from a different kernel path (full causal forward vs cached
incremental decode), so a near-tie can swap the emitted token with the one just outside the
nucleus: the token would then be masked out, its log-prob -inf and the ratio 0 (or the k3 KL
infinite). `token_logprobs` therefore keeps max(n, rank + 1) tokens, where rank is the emitted
token's 0-based rank under the trainer's logits (the stable descending order the transform uses,
ties towards the lower id): the emitted token is always kept, and in the common case (a swap of
two neighbours) exactly one extra token is. The recorded n already includes top-k's cut, so when
the guard fires the top-k bound is lifted for that position only. Positions where the guard fired
are counted (metric nucleus_guard_fraction); without top-p / top-k nothing is masked and no guard
is needed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from ..models.transformer import Transformer
from ..rollout.engine import Rollout
from ..rollout.sampling import SamplingParams, check_finite, logprobs_of


@dataclass
class RolloutBatch:
    """N responses (prompts x G, prompt-major), right-padded. R = longest response, T = longest input."""

    input_ids: Tensor  # (N, T) long: prompt + response[:-1], padded with 0 (the causal mask hides padding)
    response_ids: Tensor  # (N, R) long: response tokens, padded with 0
    response_start: Tensor  # (N,) long: input position whose logits predict response token 0 (prompt len - 1)
    mask: Tensor  # (N, R) bool: real response tokens
    engine_logprobs: Tensor  # (N, R) float32: what the engine recorded (0 in padding)
    nucleus_sizes: Tensor  # (N, R) long: recorded nucleus size per token (1 in padding)
    advantages: Tensor  # (N,) float32
    old_logprobs: Tensor | None = None  # (N, R) behaviour log-probs used in the ratio
    ref_logprobs: Tensor | None = None  # (N, R) frozen reference (kl_beta > 0)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum().item())

    def select(self, rows: Tensor) -> "RolloutBatch":
        """Rows `rows` (long indices), with the padding trimmed to their own longest sequence."""
        R = int(self.mask[rows].sum(1).max().item())
        T = int((self.response_start[rows] + self.mask[rows].sum(1)).max().item())

        def take(x: Tensor | None, width: int | None) -> Tensor | None:
            if x is None:
                return None
            x = x[rows]
            return x if width is None else x[:, :width]

        return RolloutBatch(
            input_ids=take(self.input_ids, T), response_ids=take(self.response_ids, R),
            response_start=take(self.response_start, None), mask=take(self.mask, R),
            engine_logprobs=take(self.engine_logprobs, R), nucleus_sizes=take(self.nucleus_sizes, R),
            advantages=take(self.advantages, None), old_logprobs=take(self.old_logprobs, R),
            ref_logprobs=take(self.ref_logprobs, R),
        )

    def chunks(self, rows: Tensor, size: int) -> list["RolloutBatch"]:
        """Micro-batches of `rows`, grouped by sequence length so each is padded only to its own
        longest row (the gradient is a sum over micro-batches: grouping changes no result)."""
        lengths = (self.response_start + self.mask.sum(1))[rows]
        rows = rows[torch.sort(lengths, stable=True).indices]
        return [self.select(rows[i : i + size]) for i in range(0, rows.numel(), size)]


def build_batch(rollouts: Sequence[Rollout], advantages: Tensor, device: torch.device | str) -> RolloutBatch:
    """Pad `rollouts` (one per advantage, same order) into a RolloutBatch on `device`."""
    N = len(rollouts)
    if advantages.numel() != N:
        raise ValueError(f"{N} rollouts but {advantages.numel()} advantages")
    R = max(len(r.token_ids) for r in rollouts)
    T = max(len(r.request.prompt_ids) + len(r.token_ids) - 1 for r in rollouts)
    input_ids = torch.zeros(N, T, dtype=torch.long)
    response = torch.zeros(N, R, dtype=torch.long)
    mask = torch.zeros(N, R, dtype=torch.bool)
    engine_lp = torch.zeros(N, R, dtype=torch.float32)
    nucleus = torch.ones(N, R, dtype=torch.long)
    start = torch.zeros(N, dtype=torch.long)
    for i, r in enumerate(rollouts):
        prompt, toks = list(r.request.prompt_ids), r.token_ids
        if not toks:
            raise ValueError(f"rollout {r.request.id!r} (sample {r.request.sample_index}) has no tokens")
        seq = (prompt + toks)[:-1]
        input_ids[i, : len(seq)] = torch.tensor(seq)
        n = len(toks)
        response[i, :n] = torch.tensor(toks)
        mask[i, :n] = True
        engine_lp[i, :n] = torch.tensor(r.logprobs, dtype=torch.float32)
        nucleus[i, :n] = torch.tensor(r.nucleus_sizes)
        start[i] = len(prompt) - 1
    return RolloutBatch(input_ids.to(device), response.to(device), start.to(device), mask.to(device),
                        engine_lp.to(device), nucleus.to(device), advantages.float().to(device))


def response_logits(model: Transformer, batch: RolloutBatch, what: str) -> Tensor:
    """One full causal forward; the float32 logits that predict each response token: (N, R, V).

    Raises NonFiniteLogitsError naming `what` (e.g. "step 12: training logits")."""
    logits = model(batch.input_ids).logits  # (N, T, V)
    R, V = batch.response_ids.shape[1], logits.shape[-1]
    pos = (batch.response_start[:, None] + torch.arange(R, device=logits.device)).clamp(max=logits.shape[1] - 1)
    out = logits.gather(1, pos[..., None].expand(-1, -1, V)).float()  # (N, R, V)
    check_finite(out[batch.mask], what)
    return out


class TokenLogprobs(NamedTuple):
    logprobs: Tensor  # (...) log-prob of each token under the engine's transform (differentiable)
    guarded: Tensor  # (...) bool: the nucleus guard widened this position's nucleus


def token_logprobs(logits: Tensor, tokens: Tensor, nucleus_sizes: Tensor, sampling: SamplingParams) -> TokenLogprobs:
    """Log-probs of `tokens` under the engine's transform with the recorded nucleus (guarded, see the
    module docstring): logits (..., V), tokens (...), nucleus_sizes (...)."""
    if sampling.top_k == 0 and sampling.top_p >= 1.0:  # no truncation: nothing masked, no guard needed
        return TokenLogprobs(logprobs_of(logits, tokens, sampling), torch.zeros_like(tokens, dtype=torch.bool))
    x = logits.detach().float()  # the transform ranks the float32 logits (temperature does not change ranks)
    tok = x.gather(-1, tokens[..., None])  # (..., 1)
    ids = torch.arange(x.shape[-1], device=x.device)
    rank = (x > tok).sum(-1) + ((x == tok) & (ids < tokens[..., None])).sum(-1)  # (...) 0-based
    guarded = rank + 1 > nucleus_sizes
    n = torch.maximum(nucleus_sizes, rank + 1)
    lp = logprobs_of(logits, tokens, dataclasses.replace(sampling, top_k=0), nucleus_size=n)
    return TokenLogprobs(lp, guarded)
