"""GRPO training on the rollout engine: sample prompts, generate G responses each, score, update.

One training step (`GRPOTrainer.train_step`):
    1. prompts      P records, a pure function of (run seed, step) (`PromptSource.batch`)
    2. generate     P x G responses with the injected Engine (plain, or speculative with a drafter
                    and any SpecPolicy). The engine holds the *same* model object the optimizer
                    updates, so it never samples from a stale copy; `sync_weights` only copies
                    when someone hands it an engine with its own model (a bf16 or remote copy).
    3. reward       CombinedReward over the decoded completions (errors name function, prompt, step)
    4. advantages   group-relative, advantages.py
    5. update       rl.epochs passes; each shuffles the batch and takes one AdamW step per
                    minibatch (optim.minibatch_size sequences), accumulating gradients over
                    micro-batches (optim.micro_batch_size). Log-probs come from the engine's
                    transform with the recorded nucleus sizes (batch.py, incl. the nucleus guard).
                    Old log-probs: rl.old_logprobs = engine (Rollout.logprobs, no extra forward) or
                    recompute (one no-grad forward before the first update).
    6. sync         weights to the engine (a no-op when it shares the model)
With online drafter distillation on (drafter.online, online_drafter.py), the `OnlineDrafter` hooks
wrap these: swap in the update launched at the previous step before 1; capture the training
generate (2, never the evaluation's) into the replay buffer; record rewards and advantages after
4 and launch the next update before 5, so the learner overlaps the update and the next rollout.

Determinism and resume: every random choice derives from (seed, step, purpose) - prompts from
`PromptSource.batch(step)`, sampling from the engine's per-request keys (request id
"train/<step>/<prompt id>", sample index), minibatch order from `derive_seed(seed, step,
"minibatch")` - so a checkpoint at a step boundary (model + optimizer state + the step, plus the
adaptive tuner's state when speculation is adaptive, and the online drafter's head, optimizer,
replay buffer, pending update and guard when it is on) is all an exact resume needs (checkpoint.py).
`fit` writes one every output.checkpoint_every steps and at the end when a checkpoint directory is
given; `restore` + `fit(start_step, history)` continue a run with bit-identical next steps. Evaluation requests are keyed "eval/<prompt id>" without the step: every
evaluation of a prompt uses the same uniforms (common random numbers), which makes the
before/after comparison less noisy than independent samples would.

Failures stop the run with an error naming the step: non-finite logits (in generation or
training), a non-finite loss or gradient norm, a reward function that misbehaves.

Metrics (one JSON record per line in metrics.jsonl; "kind" is "train" or "eval"):
  train record, `step` = 0-based index of the step:
    reward_mean, reward_std, reward/<name> (mean raw score per function), pass_rate (total reward
    >= rl.pass_threshold), response_len_mean, response_len_max, truncation_rate (finish "length"),
    zero_std_fraction, loss, kl_ref (k3 to the reference; null when kl_beta = 0), kl_old (k3 to the
    behaviour policy), entropy (of the sampling distribution, same transform), clip_fraction,
    ratio_mean, ratio_max (loss statistics cover the rows trained on: with rl.skip_zero_advantage,
    those with a non-zero advantage), train_skipped_fraction (rows left out: advantage 0), grad_norm (mean over updates, before clipping), lr, updates,
    logprob_gap_mean, logprob_gap_max (|train - engine| log-prob over the first minibatch's tokens,
    taken before any update of the step: the train/inference mismatch), nucleus_guard_fraction,
    tokens, tokens_per_s (generated tokens / step time), gen_tokens_per_s,
    time_generate_s, time_reward_s (scoring + advantages), time_train_s, time_sync_s, time_drafter_s
    (the trainer's own online-drafter work: swap incl. waiting for the learner, record, launch; ~0
    when off), time_step_s (the parts add up to it), r_gen (generate share),
    ceiling_s2, ceiling_s3 (1 / (r_gen / s + 1 - r_gen), metrics.py), spec_accept_len,
    spec_accept_at (list per draft position), spec_k_mean, spec_active_mean,
    spec_accepted_fraction, spec_rounds, spec_draft_s, spec_verify_s,
    online drafter (null when drafter.online is off; drafter/online.py, online_drafter.py):
    drafter_version (update whose head generated this step's rollouts; -1 = the initial head),
    drafter_actor_version (the step whose actor that update learned against), drafter_lag,
    drafter_failures (updates lost: died, raised, timed out, non-finite), drafter_restarts,
    drafter_skipped (latest mode), drafter_wait_s (swap waiting for the learner), learner_loss_first,
    learner_loss_last, learner_s, learner_tokens (of the update in use), buffer_bytes, buffer_tokens,
    buffer_sequences, drafter_stale_warnings (staleness guard warnings so far), drafter_capture_s
    (capture hook time, inside time_generate_s)
  eval record, `step` = training steps completed (0 = before training):
    eval_n, eval_pass_rate_t0, eval_pass_rate_sampled (at the rollout temperature / top-p / top-k),
    eval_pass_rate_sampled_se, eval_reward_mean_sampled, eval_s, eval_passed_sampled (0/1 per
    held-out problem, in order: the paired comparison of the summary)
"""

from __future__ import annotations

import copy
import hashlib
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from ..config import TrainConfig
from ..models.transformer import Transformer
from ..rollout.engine import Engine, Request, Rollout
from ..rollout.sampling import NonFiniteLogitsError, SamplingParams, entropy, transform
from ..tasks.arithmetic import DEFAULT_FAMILIES, ArithmeticTask
from ..tasks.data import DataError, PromptDataset, PromptRecord, builtin_prompts, collate_columns
from ..tasks.reward import CombinedReward, RewardResult
from .advantages import compute_advantages
from .batch import RolloutBatch, build_batch, response_logits, token_logprobs
from .checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from .loss import LossStats, merge_stats, policy_loss
from .metrics import MetricsLogger, spec_stats, speedup_ceiling
from .online_drafter import ONLINE_METRIC_KEYS, OnlineDrafter


# The keys of the two record kinds in metrics.jsonl (documented above; the tests hold records to them).
# Train records also carry "reward/<name>" for every reward function.
TRAIN_METRIC_KEYS: tuple[str, ...] = (
    "kind", "step", "reward_mean", "reward_std", "pass_rate", "response_len_mean", "response_len_max",
    "truncation_rate", "zero_std_fraction", "loss", "kl_ref", "kl_old", "entropy", "clip_fraction", "ratio_mean",
    "ratio_max", "train_skipped_fraction", "grad_norm", "lr", "updates", "logprob_gap_mean", "logprob_gap_max",
    "nucleus_guard_fraction",
    "tokens", "tokens_per_s", "gen_tokens_per_s", "time_generate_s", "time_reward_s", "time_train_s",
    "time_sync_s", "time_drafter_s", "time_step_s", "r_gen", "ceiling_s2", "ceiling_s3", "spec_accept_len",
    "spec_accept_at", "spec_k_mean", "spec_active_mean", "spec_accepted_fraction", "spec_rounds", "spec_draft_s",
    "spec_verify_s", *ONLINE_METRIC_KEYS,
)
EVAL_METRIC_KEYS: tuple[str, ...] = (
    "kind", "step", "eval_n", "eval_pass_rate_t0", "eval_pass_rate_sampled", "eval_pass_rate_sampled_se",
    "eval_passed_sampled",
    "eval_reward_mean_sampled", "eval_s",
)


class TrainError(ValueError):
    """Training cannot continue; the message names the step and what went wrong."""


def derive_seed(seed: int, step: int, purpose: str) -> int:
    """A 63-bit seed that is a pure function of (run seed, step, purpose)."""
    msg = f"respec-train\x1f{seed}\x1f{step}\x1f{purpose}".encode()
    return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") >> 1


# ---- prompts ------------------------------------------------------------------------------------
class PromptSource(Protocol):
    def batch(self, step: int, n: int) -> list[PromptRecord]: ...


@dataclass(frozen=True)
class TaskPrompts:
    """The built-in task's training stream: step s gets problems [s*n, (s+1)*n), never held-out ones."""

    task: ArithmeticTask

    def batch(self, step: int, n: int) -> list[PromptRecord]:
        return list(builtin_prompts(self.task, n, start=step * n).records)

    @staticmethod
    def task_for(cfg: TrainConfig, heldout: int = 0) -> ArithmeticTask:
        """The built-in task a train config names: its seed and family stream, and a held-out set
        of at least 1,000 problems (and at least `heldout` and `eval.heldout`)."""
        families, weights = cfg.data.families() or (DEFAULT_FAMILIES, None)
        return ArithmeticTask(seed=cfg.data.task_seed, families=families, weights=weights,
                              stratified=cfg.data.stratify_families, heldout_size=max(1000, cfg.eval.heldout, heldout))


@dataclass
class DatasetPrompts:
    """A prompt file, visited in epochs; each epoch is a permutation seeded by (seed, epoch)."""

    dataset: PromptDataset
    seed: int
    _perm: tuple[int, torch.Tensor] | None = field(default=None, repr=False)  # (epoch, order) cache

    def batch(self, step: int, n: int) -> list[PromptRecord]:
        out = []
        for g in range(step * n, (step + 1) * n):
            epoch, i = divmod(g, len(self.dataset))
            if self._perm is None or self._perm[0] != epoch:
                gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "data-order"))
                self._perm = (epoch, torch.randperm(len(self.dataset), generator=gen))
            out.append(self.dataset[int(self._perm[1][i])])
        return out


def check_records(records: Sequence[PromptRecord], reward_names: Sequence[str], source: str) -> None:
    """Rows the configured rewards cannot score: a DataError naming the row."""
    if "exact_answer" in reward_names:
        for r in records:
            if r.columns.get("answer") is None:
                raise DataError(f"{source}: row {r.id!r} has no 'answer' field (needed by the exact_answer reward)")


def prompt_encoder(tokenizer, chat_template: bool = False) -> Callable[[PromptRecord], tuple[int, ...]]:
    """PromptRecord -> prompt token ids: its prompt_ids, else the tokenized (optionally chat-templated) text."""

    def encode(record: PromptRecord) -> tuple[int, ...]:
        if record.prompt_ids is not None:
            return tuple(record.prompt_ids)
        if tokenizer is None:
            raise DataError(f"row {record.id!r}: a text prompt needs a tokenizer, and the model has none")
        ids = tokenizer.encode_chat(record.prompt) if chat_template else tokenizer.encode(record.prompt)
        if not ids:
            raise DataError(f"row {record.id!r}: the prompt encodes to no tokens")
        return tuple(ids)

    return encode


# ---- records ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalResult:
    step: int  # training steps completed when evaluated
    n: int
    pass_rate_t0: float  # greedy
    pass_rate_sampled: float  # at the rollout sampling parameters
    reward_mean_sampled: float
    seconds: float
    passed_sampled: tuple[int, ...] = ()  # per held-out problem, 1 = passed at the rollout sampling parameters

    @property
    def se_sampled(self) -> float:
        """Binomial standard error of pass_rate_sampled."""
        p = self.pass_rate_sampled
        return math.sqrt(p * (1 - p) / max(self.n, 1))

    def record(self) -> dict[str, Any]:
        return {"kind": "eval", "step": self.step, "eval_n": self.n, "eval_pass_rate_t0": self.pass_rate_t0,
                "eval_pass_rate_sampled": self.pass_rate_sampled, "eval_pass_rate_sampled_se": self.se_sampled,
                "eval_reward_mean_sampled": self.reward_mean_sampled, "eval_s": self.seconds,
                "eval_passed_sampled": list(self.passed_sampled)}


def paired_se(before: EvalResult, after: EvalResult) -> float | None:
    """Standard error of after - before when both scored the same problems in the same order: the
    standard deviation of the per-problem differences / sqrt(n). Problem difficulty is shared by the
    two evaluations, so this is smaller than the unpaired sqrt(se_b^2 + se_a^2). None without
    per-problem outcomes (records written before they were kept)."""
    a, b = after.passed_sampled, before.passed_sampled
    if not a or len(a) != len(b):
        return None
    d = [x - y for x, y in zip(a, b)]
    return statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0


@dataclass(frozen=True)
class History:
    """What a resumed run inherits from before its checkpoint, so its summary covers the whole run."""

    reward_means: list[float]  # per completed step, in order
    evals: list[EvalResult]  # in order of step

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> "History":
        train = sorted((r for r in records if r.get("kind") == "train"), key=lambda r: r["step"])
        evals = [EvalResult(r["step"], r["eval_n"], r["eval_pass_rate_t0"], r["eval_pass_rate_sampled"],
                            r["eval_reward_mean_sampled"], r["eval_s"], tuple(r.get("eval_passed_sampled") or ()))
                 for r in sorted((r for r in records if r.get("kind") == "eval"), key=lambda r: r["step"])]
        return cls([r["reward_mean"] for r in train], evals)


REWARD_GAIN = 0.10  # success bar of the embedded default (issue: reward +0.10, held-out +3 SE)
HELDOUT_SE = 3.0


@dataclass(frozen=True)
class TrainSummary:
    steps: int
    reward_first: float  # mean step reward over the first 10% of steps (at least one)
    reward_last: float  # ... and over the last 10%
    eval_before: EvalResult | None
    eval_after: EvalResult | None
    seconds: float

    def lines(self, temperature: float) -> list[str]:
        out = [f"reward (mean over the first 10% of steps -> the last 10%): "
               f"{self.reward_first:.3f} -> {self.reward_last:.3f}"]
        b, a = self.eval_before, self.eval_after
        if b is not None and a is not None:
            out.append(f"held-out pass rate at temperature {temperature:g} (n={a.n}): "
                       f"{b.pass_rate_sampled:.3f} ± {b.se_sampled:.3f} -> {a.pass_rate_sampled:.3f} ± {a.se_sampled:.3f}"
                       f"  (greedy: {b.pass_rate_t0:.3f} -> {a.pass_rate_t0:.3f})")
        else:
            out.append("held-out pass rate: not evaluated (no held-out set)")
        out.extend(self.success_lines())
        return out

    def success_lines(self) -> list[str]:
        """The embedded default's success bar: training reward over the last 10% of steps at least
        REWARD_GAIN above the first 10%, and the held-out pass rate at the training temperature up by
        at least HELDOUT_SE standard errors (the larger binomial SE of the two evaluations). The
        paired z (the gain over the SE of the per-problem differences) is printed beside it."""
        gain = self.reward_last - self.reward_first
        out = [f"success: reward gain {gain:+.3f} (bar +{REWARD_GAIN:.2f}): {'met' if gain >= REWARD_GAIN else 'NOT met'}"]
        b, a = self.eval_before, self.eval_after
        if b is not None and a is not None:
            delta = a.pass_rate_sampled - b.pass_rate_sampled
            se = max(a.se_sampled, b.se_sampled, 1e-12)
            paired = paired_se(b, a)
            z = f", paired z {delta / paired:.1f}" if paired else ""
            out.append(f"success: held-out gain {delta:+.3f} = {delta / se:.1f} SE (bar {HELDOUT_SE:g} SE{z}): "
                       f"{'met' if delta >= HELDOUT_SE * se else 'NOT met'}")
        return out


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over optim.warmup_steps, then constant or cosine down to min_lr_ratio at the last step."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    frac = (step - o.warmup_steps) / max(1, cfg.steps - 1 - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


# ---- the trainer --------------------------------------------------------------------------------
class GRPOTrainer:
    def __init__(
        self,
        cfg: TrainConfig,
        model: Transformer,
        engine: Engine,
        prompts: PromptSource,
        reward: CombinedReward,
        *,
        encode: Callable[[PromptRecord], tuple[int, ...]] | None = None,
        decode: Callable[[list[int]], str] = lambda ids: " ".join(map(str, ids)),
        heldout: Sequence[PromptRecord] = (),
        logger: MetricsLogger | None = None,
        progress: Callable[[str], None] | None = None,
        checkpoint_dir: Path | None = None,
    ) -> None:
        cfg.validate()
        self.cfg, self.model, self.engine, self.prompts, self.reward = cfg, model, engine, prompts, reward
        self.encode = encode or prompt_encoder(None)
        self.decode = decode
        self.heldout = list(heldout)
        self.logger, self.progress = logger, progress
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        r = cfg.rollout
        self.sampling = SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
        self.device = model.device
        # The reference policy exists only when the KL term is on: a frozen copy of the initial weights.
        self.ref_model = None
        if cfg.rl.kl_beta > 0:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        o = cfg.optim
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2),
        )
        # online drafter distillation (no-op hooks when drafter.online resolves to off)
        self.online = OnlineDrafter.from_config(cfg, engine, say=self._say)

    # ---- one step ---------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, Any]:
        cfg, r = self.cfg, self.cfg.rollout
        t0 = time.perf_counter()
        self.online.begin(step)  # the drafter update launched at step - 1
        tg = time.perf_counter()
        records = self.prompts.batch(step, r.prompts_per_step)
        check_records(records, self.reward.names, "training prompts")
        requests = [Request(f"train/{step}/{rec.id}", ids, s, r.max_new_tokens)
                    for rec, ids in zip(records, map(self.encode, records)) for s in range(r.group_size)]
        with self.online.capturing(requests, step):
            gen = self._generate(requests, self.sampling, step)
        t1 = time.perf_counter()
        scores = self._score(records, gen.rollouts, r.group_size, step)
        rewards = scores.total.view(len(records), r.group_size)  # (P, G)
        adv = compute_advantages(rewards, cfg.rl.advantage, eps=cfg.rl.std_eps, scale=cfg.rl.dr_grpo_scale)
        t2 = time.perf_counter()
        self.online.record(scores.total, adv.values.flatten())
        self.online.launch(step, self.model)  # snapshots the actor's embedding / LM head before the update
        tu = time.perf_counter()

        batch = build_batch(gen.rollouts, adv.values.flatten(), self.device)
        self._behaviour_logprobs(batch, step)
        update = self._update(batch, step)
        t3 = time.perf_counter()
        sync_s = self.sync_weights()
        t4 = time.perf_counter()

        step_s = t4 - t0
        r_gen = (t1 - tg) / step_s
        lens = [len(x.token_ids) for x in gen.rollouts]
        spec = spec_stats(gen)
        st = update.stats
        passed = (scores.total >= cfg.rl.pass_threshold).float()
        return {
            "kind": "train", "step": step,
            "reward_mean": scores.total.mean().item(), "reward_std": scores.total.std().item(),
            **{f"reward/{name}": scores.scores[:, j].mean().item() for j, name in enumerate(scores.names)},
            "pass_rate": passed.mean().item(),
            "response_len_mean": sum(lens) / len(lens), "response_len_max": max(lens),
            "truncation_rate": sum(x.finish_reason == "length" for x in gen.rollouts) / len(lens),
            "zero_std_fraction": adv.zero_std_fraction,
            "loss": update.loss, "kl_ref": st.kl_ref, "kl_old": st.kl_old, "entropy": st.entropy,
            "clip_fraction": st.clip_fraction, "ratio_mean": st.ratio_mean, "ratio_max": st.ratio_max,
            "grad_norm": update.grad_norm, "lr": update.lr, "updates": update.updates,
            "logprob_gap_mean": st.logprob_gap_mean, "logprob_gap_max": st.logprob_gap_max,
            "nucleus_guard_fraction": update.guard_fraction, "train_skipped_fraction": update.skipped_fraction,
            "tokens": gen.tokens, "tokens_per_s": gen.tokens / step_s, "gen_tokens_per_s": gen.tokens / (t1 - tg),
            "time_generate_s": t1 - tg, "time_reward_s": t2 - t1, "time_train_s": t3 - tu, "time_sync_s": sync_s,
            "time_drafter_s": (tg - t0) + (tu - t2), "time_step_s": step_s, "r_gen": r_gen,
            "ceiling_s2": speedup_ceiling(r_gen, 2.0), "ceiling_s3": speedup_ceiling(r_gen, 3.0),
            "spec_accept_len": spec.accept_len, "spec_accept_at": spec.accept_at, "spec_k_mean": spec.k_mean,
            "spec_active_mean": spec.active_mean, "spec_accepted_fraction": spec.accepted_fraction,
            "spec_rounds": spec.rounds, "spec_draft_s": spec.draft_s, "spec_verify_s": spec.verify_s,
            **self.online.metrics(step, gen),
        }

    def _generate(self, requests: list[Request], sampling: SamplingParams, step: int):
        self.model.eval()
        try:
            return self.engine.generate(requests, sampling)
        except NonFiniteLogitsError as e:
            raise TrainError(f"step {step}: rollout generation: {e}") from e

    def _score(self, records: Sequence[PromptRecord], rollouts: Sequence[Rollout], G: int, step: int) -> RewardResult:
        """Decode and score; `columns` and prompts repeat each record G times (rollouts are prompt-major)."""
        texts = [self.decode(x.token_ids) for x in rollouts]
        prompts = [rec.prompt if rec.prompt is not None else self.decode(list(self.encode(rec))) for rec in records]
        columns = {k: [v for v in vals for _ in range(G)] for k, vals in collate_columns(records).items()}
        return self.reward(
            completions=texts, prompts=[p for p in prompts for _ in range(G)],
            completion_ids=[x.token_ids for x in rollouts], columns=columns,
            record_ids=[rec.id for rec in records for _ in range(G)], step=step,
        )

    @torch.no_grad()
    def _behaviour_logprobs(self, batch: RolloutBatch, step: int) -> None:
        """Fill batch.old_logprobs (engine-recorded, or one no-grad forward) and batch.ref_logprobs."""
        rl = self.cfg.rl
        batch.old_logprobs = batch.engine_logprobs
        if rl.old_logprobs == "engine" and self.ref_model is None:
            return
        old = torch.zeros_like(batch.engine_logprobs)
        ref = torch.zeros_like(batch.engine_logprobs) if self.ref_model is not None else None
        rows = torch.arange(batch.size, device=self.device)
        size = self.cfg.optim.micro_batch_size
        for i in range(0, batch.size, size):
            idx = rows[i : i + size]
            mb = batch.select(idx)
            R = mb.response_ids.shape[1]
            if rl.old_logprobs == "recompute":
                self.model.eval()
                logits = response_logits(self.model, mb, f"step {step}: recomputed old log-probs")
                old[idx, :R] = token_logprobs(logits, mb.response_ids, mb.nucleus_sizes, self.sampling).logprobs
            if ref is not None:
                logits = response_logits(self.ref_model, mb, f"step {step}: reference log-probs")
                ref[idx, :R] = token_logprobs(logits, mb.response_ids, mb.nucleus_sizes, self.sampling).logprobs
        if rl.old_logprobs == "recompute":
            batch.old_logprobs = torch.where(batch.mask, old, 0.0)
        batch.ref_logprobs = ref

    def _update(self, batch: RolloutBatch, step: int) -> "_UpdateResult":
        cfg, rl, o = self.cfg, self.cfg.rl, self.cfg.optim
        lr = lr_at(step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, "minibatch"))
        mb_size = o.minibatch_size or batch.size
        parts: list[LossStats] = []
        norms, losses = [], []
        guarded = tokens = skipped = 0
        self.model.train()
        for _ in range(rl.epochs):
            order = torch.randperm(batch.size, generator=gen).to(self.device)
            for start in range(0, batch.size, mb_size):
                rows = order[start : start + mb_size]
                n_tok, n_seq = int(batch.mask[rows].sum().item()), rows.numel()  # denominators: every row
                first = not norms  # no update yet this step: the weights are the engine's
                keep = self._rows_with_gradient(batch, rows)
                skipped += rows.numel() - keep.numel()
                rows = keep
                self.optimizer.zero_grad(set_to_none=True)
                mb_loss = 0.0
                for micro in batch.chunks(rows, o.micro_batch_size):
                    logits = response_logits(self.model, micro, f"step {step}: training logits")  # (n, R, V)
                    lp, hit = token_logprobs(logits, micro.response_ids, micro.nucleus_sizes, self.sampling)
                    with torch.no_grad():
                        ent = entropy(transform(logits.detach(), self.sampling, validate=False).probs)  # (n, R)
                    loss, stats = policy_loss(
                        lp, micro.old_logprobs, micro.advantages, micro.mask,
                        clip_low=rl.clip_low, clip_high=rl.clip_high, aggregation=rl.aggregation,
                        kl_beta=rl.kl_beta, ref_logprobs=micro.ref_logprobs, num_tokens=n_tok,
                        num_sequences=n_seq, max_len=cfg.rollout.max_new_tokens, entropy=ent,
                        engine_logprobs=micro.engine_logprobs if first else None,
                    )
                    if not torch.isfinite(loss):
                        raise TrainError(f"step {step}: non-finite loss ({loss.item()})")
                    loss.backward()
                    mb_loss += loss.item()
                    parts.append(stats)
                    guarded += int((hit & micro.mask).sum().item())
                    tokens += stats.tokens
                norm = torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm or float("inf"))
                if not torch.isfinite(norm):
                    raise TrainError(f"step {step}: non-finite gradient norm ({norm.item()})")
                self.optimizer.step()
                norms.append(norm.item())
                losses.append(mb_loss)
        self.model.eval()
        return _UpdateResult(
            stats=merge_stats(parts), loss=sum(losses) / len(losses), grad_norm=sum(norms) / len(norms),
            lr=lr, updates=len(norms), guard_fraction=guarded / max(tokens, 1),
            skipped_fraction=skipped / max(rl.epochs * batch.size, 1),
        )

    def _rows_with_gradient(self, batch: RolloutBatch, rows: Tensor) -> Tensor:
        """The rows of a minibatch whose forward/backward can change the weights.

        With kl_beta = 0, a response with advantage 0 (every response of a zero-variance group) has
        per-token loss -min(ratio * 0, clip(ratio) * 0) = 0 and gradient exactly 0, whatever its
        log-probs: leaving it out of the forward changes no weight, while the loss denominators stay
        the whole minibatch's (the caller takes them before filtering). At 41% pass rate and G = 4
        most groups have zero variance, so this removes most of the train phase. One row is always
        kept so the step still measures the train/engine log-prob gap and AdamW sees a gradient
        (zero) for every parameter, exactly as with the full minibatch. rl.skip_zero_advantage =
        false runs every row (the same update; statistics such as entropy then cover every row)."""
        if not self.cfg.rl.skip_zero_advantage or self.cfg.rl.kl_beta > 0:
            return rows
        keep = rows[batch.advantages[rows] != 0]
        return keep if keep.numel() else rows[:1]

    def sync_weights(self) -> float:
        """Make the engine sample from the updated weights; returns seconds spent (0 when shared)."""
        t = time.perf_counter()
        if self.engine.model is not self.model:
            self.engine.model.load_state_dict(self.model.state_dict())
        return time.perf_counter() - t

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, step: int) -> EvalResult:
        """Held-out pass rate, greedy and at the rollout sampling parameters."""
        t0 = time.perf_counter()
        max_new = self.cfg.eval.max_new_tokens or self.cfg.rollout.max_new_tokens
        records = self.heldout
        requests = [Request(f"eval/{rec.id}", ids, 0, max_new) for rec, ids in zip(records, map(self.encode, records))]
        out = {}
        for name, sampling in (("t0", SamplingParams(temperature=0.0)), ("sampled", self.sampling)):
            gen = self._generate(requests, sampling, step)
            scores = self._score(records, gen.rollouts, 1, step)
            passed = scores.total >= self.cfg.rl.pass_threshold
            out[name] = (passed.float().mean().item(), scores.total.mean().item(), tuple(passed.int().tolist()))
        return EvalResult(step, len(records), out["t0"][0], out["sampled"][0], out["sampled"][1],
                          time.perf_counter() - t0, out["sampled"][2])

    # ---- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, done: int) -> Path:
        """Checkpoint after `done` completed steps into checkpoint_dir (atomic; checkpoint.py)."""
        assert self.checkpoint_dir is not None
        return save_checkpoint(self.checkpoint_dir, done, self.model, self.optimizer,
                               data_position=done * self.cfg.rollout.prompts_per_step, policy=self.engine.policy,
                               keep=self.cfg.output.keep_checkpoints,
                               drafter=self.online if self.online.enabled else None)

    def restore(self, path: Path | None = None) -> TrainState:
        """Load a checkpoint (default: checkpoint_dir's latest) into the actor, optimizer, policy and
        online drafter.

        Build the trainer from the run's *initial* actor first: the reference model (kl_beta > 0) is
        the copy taken at construction, i.e. the initial weights, as in the uninterrupted run."""
        path = Path(path) if path is not None else latest_checkpoint(self.checkpoint_dir)
        state = load_checkpoint(path, self.model, self.optimizer, self.engine.policy,
                                drafter=self.online if self.online.enabled else None)
        expected = state.step * self.cfg.rollout.prompts_per_step
        if state.data_position != expected:
            raise TrainError(f"{path}: data position {state.data_position} != step {state.step} x "
                             f"rollout.prompts_per_step {self.cfg.rollout.prompts_per_step}")
        self.sync_weights()
        return state

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self, start_step: int = 0, history: History | None = None) -> TrainSummary:
        """Steps start_step .. cfg.steps - 1; a resumed run passes the step and History it restored."""
        cfg = self.cfg
        t_start = time.perf_counter()
        if self.heldout:
            check_records(self.heldout, self.reward.names, "held-out prompts")
        history = history or History([], [])
        evals = list(history.evals)
        if self.heldout and start_step == 0:
            evals = [self._eval_and_log(0)]
        reward_means = list(history.reward_means[:start_step])
        every = cfg.output.checkpoint_every if self.checkpoint_dir is not None else 0
        try:
            for step in range(start_step, cfg.steps):
                m = self.train_step(step)
                reward_means.append(m["reward_mean"])
                if self.logger is not None:
                    self.logger.log(m)
                drafter = f" | drafter v{m['drafter_version']}" if self.online.enabled else ""
                self._say(f"step {step + 1}/{cfg.steps} | reward {m['reward_mean']:.3f} | pass {m['pass_rate']:.3f} | "
                          f"acc_len {m['spec_accept_len']:.2f} | {m['time_step_s']:.2f}s (gen {m['r_gen']:.0%})"
                          + drafter)
                done = step + 1
                if self.heldout and (done == cfg.steps or (cfg.eval.every and done % cfg.eval.every == 0)):
                    evals.append(self._eval_and_log(done))
                if every and (done % every == 0 or done == cfg.steps):
                    self.save_checkpoint(done)
            self.online.finish()  # the head now holds the last update (what run.py saves)
        finally:
            self.close()
        k = max(1, round(0.1 * cfg.steps))
        return TrainSummary(
            steps=cfg.steps, reward_first=sum(reward_means[:k]) / k, reward_last=sum(reward_means[-k:]) / k,
            eval_before=evals[0] if evals else None, eval_after=evals[-1] if len(evals) > 1 else None,
            seconds=time.perf_counter() - t_start,
        )

    def close(self) -> None:
        """Stop the online drafter's learner process (fit does this on return and on errors; idempotent)."""
        self.online.close()

    def _eval_and_log(self, step: int) -> EvalResult:
        res = self.evaluate(step)
        if self.logger is not None:
            self.logger.log(res.record())
        self._say(f"eval after {step} steps | pass@T={self.sampling.temperature:g} {res.pass_rate_sampled:.3f} "
                  f"± {res.se_sampled:.3f} | greedy {res.pass_rate_t0:.3f} | n={res.n} | {res.seconds:.1f}s")
        return res

    def _say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)


@dataclass(frozen=True)
class _UpdateResult:
    stats: LossStats
    loss: float  # mean minibatch loss over the step's updates
    grad_norm: float  # mean pre-clipping gradient norm over the updates
    lr: float
    updates: int
    guard_fraction: float  # response tokens whose nucleus the guard widened (batch.py)
    skipped_fraction: float = 0.0  # rows left out of the forward: advantage 0, no gradient (_rows_with_gradient)
