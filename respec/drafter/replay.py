"""The online drafter's data: per committed token, captured from the rollouts for free.

Where the signals come from: the engine's capture hook (engine.Commit), not the trainer's forward.
Every committed token's target features and transformed target distribution already exist in the
verify pass that produced it (plain and speculative rounds alike), so capture costs a top-k and a
device-to-host copy of the kept rows, no extra target forward. The trainer's forward would also
see every token, but only after the rollouts are scored, inside the optimizer's memory peak, with
the training-mode (micro-batched, possibly bf16-autocast) numerics rather than the exact law the
engine sampled from; and it would need the feature layers threaded through the RL loss.

Per kept rollout, a `SequenceRecord` holds the whole sequence in position order, c = len(prompt) - 1
context positions (the prompt, from the engine's `Prefill` event) and then n committed ones:
    tokens         the prompt, then the n response tokens                          (c+n+1,)
    features[t]    the target's low/mid/high layer outputs at input tokens[t]     (c+n, F)  bf16
    topk_*[j]      for committed position c+j: the target's k most likely *next* tokens (the law
                   of tokens[c+j+1]) and their log-probs, plus the log of the remaining mass
                   ("other" bucket)                                                (n, k), (n,)
    reward, reward_z (reward standardized over the step's rollouts), advantage, step, context = c
This is what EagleHead.train_forward consumes (entry t pairs features[t] with tokens[t+1]); the
loss covers the committed positions only. The prompt is context, as it is when the engine drafts:
a head trained on the response alone learns a different conditional. Measured on the built-in
actor and its drafter (64 held-out samples, depth 3): expected acceptance per step 0.79 / 0.79 /
0.79 with the prompt in context vs 0.69 / 0.67 / 0.66 from the last prompt token on (the loss
1.46 vs 3.05), and online updates on response-only windows lowered the head's acceptance in
every variant (`respec bench stale` before this layout).

Memory: per committed token (`bytes_per_token`) F * 2 (bf16 features, F = layers x hidden) +
k * 8 (int32 id + fp32 log-prob) + 4 (other) + 4 (token); per record, its prompt's c * (F * 2 + 4)
+ 4 bytes more. Built-in actor (hidden 256, 3 feature layers, k = 16): 1,672 B per token and
~1.5 KB per prompt token (prompts of ~20 tokens vs responses of ~60). A 7B model (hidden 4096,
3 layers, k = 16): 24,712 B, i.e. 101 MB per 4K-token response and 51.8 GB for a step of 512 such
responses if all were kept - hence the fraction of each step's sequences kept (`select_rollouts`)
and the byte budget of the buffer.

The buffer keeps whole sequences (the unroll needs consecutive positions), evicts the oldest first
when over its byte budget, and samples uniformly from the sequences of the newest steps.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, fields
from typing import Iterable, Sequence

import torch
from torch import Tensor

from ..rollout.engine import Commit, Prefill, Request
from .distill import TopKTarget

WEIGHTINGS = ("none", "reward", "normalized", "advantage")


def bytes_per_token(hidden_size: int, num_feature_layers: int, top_k: int,
                    feature_dtype: torch.dtype = torch.bfloat16) -> int:
    """Host bytes one kept token costs in the buffer (see the module docstring for the layout)."""
    feature = num_feature_layers * hidden_size * torch.empty((), dtype=feature_dtype).element_size()
    return feature + top_k * (4 + 4) + 4 + 4


def seeded_generator(seed: int, step: int, purpose: str) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, step, purpose)."""
    msg = f"respec-online\x1f{seed}\x1f{step}\x1f{purpose}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") >> 1)


def select_rollouts(n: int, fraction: float, generator: torch.Generator) -> Tensor:
    """Which of a step's n rollouts to keep: round(fraction * n) of them (at least one), at random. (n,) bool."""
    keep = torch.zeros(n, dtype=torch.bool)
    count = min(n, max(1, round(fraction * n))) if fraction > 0 and n else 0
    keep[torch.randperm(n, generator=generator)[:count]] = True
    return keep


# ---- records -------------------------------------------------------------------------------------
@dataclass
class SequenceRecord:
    """One kept rollout: its prompt as context, then its committed positions (module docstring)."""

    tokens: Tensor  # (c+n+1,) int32: the prompt (c+1 tokens), then the n response tokens
    features: Tensor  # (c+n, F) bf16 on the host: target features at inputs tokens[0..c+n-1]
    topk_ids: Tensor  # (n, k) int32: the target's k most likely tokens for position c+j+1
    topk_logprobs: Tensor  # (n, k) float32
    other_logmass: Tensor  # (n,) float32: log(1 - top-k mass), -inf when the top k hold it all
    reward: float
    reward_z: float  # (reward - step mean) / step std over all the step's rollouts; 0 when they are equal
    advantage: float
    step: int  # actor version that generated it
    context: int = 0  # c: positions before the first committed input (prompt length - 1)

    @property
    def length(self) -> int:
        """Committed tokens (= target laws stored; the loss positions)."""
        return self.topk_ids.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.tokens, self.features, self.topk_ids, self.topk_logprobs, self.other_logmass))

    def window(self, start: int, length: int) -> "SequenceRecord":
        """`length` committed positions from `start`, everything before them kept as context (views, no copy)."""
        end = self.context + start + length  # first position past the window
        return SequenceRecord(self.tokens[: end + 1], self.features[:end], self.topk_ids[start : start + length],
                              self.topk_logprobs[start : start + length], self.other_logmass[start : start + length],
                              self.reward, self.reward_z, self.advantage, self.step, self.context + start)


_TENSOR_FIELDS = ("tokens", "features", "topk_ids", "topk_logprobs", "other_logmass")
_SCALAR_FIELDS = tuple(f.name for f in fields(SequenceRecord) if f.name not in _TENSOR_FIELDS)


def topk_target(probs: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(N, V) probabilities -> top-k ids (N, k) int32, their log-probs (N, k) fp32, log other mass (N,) fp32."""
    p, ids = probs.float().topk(min(k, probs.shape[-1]), dim=-1)  # (N, k) descending
    rest = probs.float().scatter(-1, ids, 0.0).sum(-1)  # (N,) summed directly: 1 - sum(p) would cancel
    return ids.int(), p.log(), rest.log()


class CaptureCollector:
    """Engine capture hook: keeps the committed rows of the selected rollouts, assembled per rollout.

    Use: `engine.capture = collector`, generate, then `finish(rewards, advantages)` once the step
    is scored. The prompt features of kept rows are copied at admission (`Prefill`); each round's
    kept rows are reduced to top-k on the device and copied to the host (features as bf16); rows
    of unselected rollouts are never copied. The engine must capture features (a drafter with
    feature_layers, or Engine(feature_layers=...)).
    """

    def __init__(self, requests: Sequence[Request], top_k: int, keep: Tensor | None = None, step: int = 0,
                 feature_dtype: torch.dtype = torch.bfloat16) -> None:
        self.requests = list(requests)
        self.top_k, self.step, self.feature_dtype = top_k, step, feature_dtype
        self.keep = torch.ones(len(self.requests), dtype=torch.bool) if keep is None else keep.bool().cpu()
        self._keep_dev: Tensor | None = None  # keep, on the engine's device (made on the first commit)
        self._chunks: list[tuple[Tensor, ...]] = []
        self._prompt_features: dict[int, Tensor] = {}  # request index -> (c, F) on the host

    def __call__(self, event: Prefill | Commit) -> None:
        if event.features is None:
            raise ValueError("CaptureCollector needs target features: give the engine feature_layers or an EAGLE drafter")
        if self._keep_dev is None:
            self._keep_dev = self.keep.to(event.rollout_index.device)
        if isinstance(event, Prefill):
            rows = self._keep_dev[event.rollout_index].nonzero()[:, 0].tolist()
            if rows:
                feats = event.features[rows].to(self.feature_dtype).cpu()  # indexing copies the engine's buffer
                for i, (ri, n) in enumerate(zip(event.rollout_index[rows].tolist(), event.lengths[rows].tolist())):
                    self._prompt_features[ri] = feats[i, :n].clone()
            return
        commit = event
        rows = self._keep_dev[commit.rollout_index].nonzero()[:, 0]  # host sync (the engine syncs per round anyway)
        if rows.numel() == 0:
            return
        ids, lp, other = topk_target(commit.target_probs[rows], self.top_k)
        self._chunks.append((
            commit.rollout_index[rows].cpu(), commit.positions[rows].cpu(),
            commit.features[rows].to(self.feature_dtype).cpu(), ids.cpu(), lp.cpu(), other.cpu(),
            commit.next_tokens[rows].int().cpu(),
        ))

    def finish(self, rewards: Sequence[float] | Tensor, advantages: Sequence[float] | Tensor) -> list[SequenceRecord]:
        """Per kept rollout (in request order) its record; rewards / advantages (R,) cover ALL the
        step's rollouts (reward_z is standardized over all of them, not only the kept ones)."""
        rewards = torch.as_tensor(rewards, dtype=torch.float64).flatten()
        advantages = torch.as_tensor(advantages, dtype=torch.float64).flatten()
        R = len(self.requests)
        if rewards.numel() != R or advantages.numel() != R:
            raise ValueError(f"need one reward and advantage per rollout ({R}), "
                             f"got {rewards.numel()} and {advantages.numel()}")
        std = rewards.std(unbiased=False)
        z = (rewards - rewards.mean()) / std if std > 1e-12 else torch.zeros_like(rewards)
        if not self._chunks:
            self._prompt_features = {}
            return []
        rix, pos, feats, ids, lp, other, nxt = (torch.cat(c) for c in zip(*self._chunks))
        self._chunks = []
        order = torch.argsort(rix * (int(pos.max()) + 1) + pos)  # by rollout, then position
        rix, pos, feats, ids, lp, other, nxt = (t[order] for t in (rix, pos, feats, ids, lp, other, nxt))
        counts = torch.bincount(rix, minlength=R).tolist()
        out, start = [], 0
        for r in range(R):
            n = counts[r]
            if n == 0:
                continue
            sl = slice(start, start + n)
            start += n
            prompt = self.requests[r].prompt_ids
            first = len(prompt) - 1
            if pos[sl].tolist() != list(range(first, first + n)):
                raise ValueError(f"rollout {r}: committed positions are not consecutive from {first}")
            context = self._prompt_features.get(r, feats.new_zeros(0, feats.shape[1]))
            if context.shape[0] != first:
                raise ValueError(f"rollout {r}: {context.shape[0]} prompt features captured for a prompt of "
                                 f"{len(prompt)} tokens (attach the collector before generate)")
            tokens = torch.cat([torch.tensor(prompt, dtype=torch.int32), nxt[sl]])
            out.append(SequenceRecord(tokens, torch.cat([context, feats[sl]]), ids[sl], lp[sl], other[sl],
                                      float(rewards[r]), float(z[r]), float(advantages[r]), self.step, first))
        self._prompt_features = {}
        return out


# ---- sample weights ------------------------------------------------------------------------------
def sample_weights(records: Sequence[SequenceRecord], mode: str, floor: float, cap: float) -> Tensor:
    """Per-sequence loss weights (B,) float32 (formulas in online.py's docstring).

    none        w = 1
    reward      w = floor + (1 - floor) * clip(r, 0, 1)          (rewards in [0, 1])
    normalized  w = clip(1 + z, floor, cap),  z = step-standardized reward
    advantage   w = clip(A, floor, cap)                           (positive advantage; floor 0 = literal)
    """
    r = torch.tensor([x.reward for x in records], dtype=torch.float32)
    if mode == "none":
        return torch.ones_like(r)
    if mode == "reward":
        return floor + (1 - floor) * r.clamp(0, 1)
    if mode == "normalized":
        z = torch.tensor([x.reward_z for x in records], dtype=torch.float32)
        return (1 + z).clamp(floor, cap)
    if mode == "advantage":
        a = torch.tensor([x.advantage for x in records], dtype=torch.float32)
        return a.clamp(floor, cap)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {mode!r}")


# ---- learner batches -----------------------------------------------------------------------------
@dataclass
class DistillBatch:
    """Right-padded sequences for one learner update (what distill_loss takes)."""

    tokens: Tensor  # (B, T) long, padded with 0
    features: Tensor  # (B, T, F) bf16, zeros on padding (position T-1 is never read)
    target: TopKTarget  # (B, T, k) / (B, T): law of token t+1 at position t
    loss_mask: Tensor  # (B, T) bool: positions with a stored law
    weights: Tensor  # (B,) float32 sample weights
    steps: Tensor  # (B,) long: actor version each row was generated by

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())


def collate(records: Sequence[SequenceRecord], weights: Tensor) -> DistillBatch:
    B, T = len(records), max(r.context + r.length for r in records) + 1
    F, k = records[0].features.shape[1], records[0].topk_ids.shape[1]
    tokens = torch.zeros(B, T, dtype=torch.long)
    feats = torch.zeros(B, T, F, dtype=records[0].features.dtype)
    ids = torch.zeros(B, T, k, dtype=torch.long)
    lp = torch.zeros(B, T, k)  # padding: finite values (masked out; a -inf would turn 0-weight grads into NaN)
    other = torch.full((B, T), float("-inf"))
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, r in enumerate(records):
        c, n = r.context, r.length
        tokens[b, : c + n + 1] = r.tokens
        feats[b, : c + n] = r.features
        ids[b, c : c + n] = r.topk_ids
        lp[b, c : c + n] = r.topk_logprobs
        other[b, c : c + n] = r.other_logmass
        mask[b, c : c + n] = True
    return DistillBatch(tokens, feats, TopKTarget(ids, lp, other), mask, weights.float(),
                        torch.tensor([r.step for r in records]))


# ---- the buffer ----------------------------------------------------------------------------------
class ReplayBuffer:
    """Whole sequences under a byte budget, oldest dropped first."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._seqs: deque[SequenceRecord] = deque()
        self.nbytes = 0  # bytes of the tensors held
        self.evicted = 0  # sequences dropped for space so far
        self.rejected = 0  # sequences larger than the whole budget (never stored)

    def __len__(self) -> int:
        return len(self._seqs)

    @property
    def tokens(self) -> int:
        return sum(r.length for r in self._seqs)

    @property
    def newest_step(self) -> int | None:
        return self._seqs[-1].step if self._seqs else None

    def add(self, records: Iterable[SequenceRecord]) -> None:
        for r in records:
            size = r.nbytes
            if size > self.max_bytes:
                self.rejected += 1
                continue
            while self.nbytes + size > self.max_bytes:
                self.nbytes -= self._seqs.popleft().nbytes
                self.evicted += 1
            self._seqs.append(r)
            self.nbytes += size

    def sample(self, max_tokens: int, generator: torch.Generator, min_step: int | None = None) -> list[SequenceRecord]:
        """Sequences (of step >= min_step) in a random order until max_tokens committed positions;
        one longer than the whole budget is cropped to a random window of max_tokens."""
        pool = [r for r in self._seqs if min_step is None or r.step >= min_step]
        out, used = [], 0
        for i in torch.randperm(len(pool), generator=generator).tolist():
            r = pool[i]
            if not out and r.length > max_tokens:
                start = int(torch.randint(0, r.length - max_tokens + 1, (), generator=generator))
                return [r.window(start, max_tokens)]
            if used + r.length <= max_tokens:
                out.append(r)
                used += r.length
        return out

    # ---- checkpointing (exact resume: the next update samples from this content) ---------------
    def state(self) -> tuple[dict[str, Tensor], dict]:
        """(tensors for a safetensors file, JSON-able metadata)."""
        tensors = {f"{i}/{name}": getattr(r, name).contiguous()
                   for i, r in enumerate(self._seqs) for name in _TENSOR_FIELDS}
        meta = {"max_bytes": self.max_bytes, "evicted": self.evicted, "rejected": self.rejected,
                "records": [{name: getattr(r, name) for name in _SCALAR_FIELDS} for r in self._seqs]}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict) -> "ReplayBuffer":
        buf = cls(meta["max_bytes"])
        for i, scalars in enumerate(meta["records"]):
            buf.add([SequenceRecord(**{name: tensors[f"{i}/{name}"] for name in _TENSOR_FIELDS}, **scalars)])
        buf.evicted, buf.rejected = meta["evicted"], meta["rejected"]
        return buf
