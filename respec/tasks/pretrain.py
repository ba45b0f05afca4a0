"""`respec pretrain`: build the built-in actor by supervised learning on the arithmetic task.

The actor is a small Qwen2-architecture model (config: `ActorConfig`), trained from scratch with
AdamW on prompt -> written-out solution pairs (loss on response tokens only), then saved as an
HF-format checkpoint (loadable by transformers) in a cache directory keyed by a hash of its
config, so every later command reuses it (`ensure_builtin_actor`). The checkpoint also records its
measured held-out pass rates (respec_pretrain.json), which is how the default size was chosen:
RL needs a base whose pass rate at temperature 1 leaves room (roughly 30-70%).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import _help
from ..models import ModelConfig, Tokenizer, Transformer, save_pretrained
from ..report.progress import ProgressBar
from .arithmetic import ArithmeticTask
from .tokenizer import EOS, PAD, VOCAB, build_tokenizer, save_tokenizer_files


# Bump when the code changes the weights a given config builds, so no cache holds an actor this code
# would not rebuild bit for bit. 2: bf16-autocast attention on CPU is the grouped eager form
# (models.transformer.causal_attention) instead of SDPA's flash kernel (pretraining ~20% faster).
BUILD_VERSION = 2


@dataclass(frozen=True)
class PretrainConfig:
    hidden_size: int = _help("actor width", 256)
    num_layers: int = _help("actor decoder layers", 6)
    num_heads: int = _help("attention heads", 4)
    num_kv_heads: int = _help("key/value heads (GQA)", 2)
    intermediate_size: int = _help("SwiGLU width", 768)
    steps: int = _help("optimizer steps", 1500)
    tokens_per_step: int = _help("padded tokens per batch (length-bucketed batches)", 2048)
    lr: float = _help("peak learning rate (cosine decay after warm-up)", 2e-3)
    warmup: int = _help("linear warm-up steps", 30)
    weight_decay: float = _help("AdamW weight decay", 0.05)
    seed: int = _help("initialisation and data seed", 0)
    task_seed: int = _help("seed of the arithmetic task stream", 0)
    bf16_autocast: bool = _help("bf16 autocast for the forward (pretraining runs on the CPU)", True)
    eval_problems: int = _help("held-out problems scored after training", 200)
    output: str = _help("where to save; empty = the shared cache (reused by every command)", "")
    force: bool = _help("rebuild even if a cached actor exists", False)

    def model_config(self) -> ModelConfig:
        eos = VOCAB.index(EOS)
        return ModelConfig(
            arch="qwen2", vocab_size=len(VOCAB), hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_layers, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, max_position_embeddings=1024, tie_word_embeddings=True,
            bos_token_id=VOCAB.index("<bos>"), eos_token_ids=(eos,), pad_token_id=VOCAB.index(PAD),
        )

    def cache_key(self) -> str:
        d = asdict(self)
        for k in ("output", "force", "eval_problems"):
            d.pop(k)
        task = ArithmeticTask(seed=self.task_seed, heldout_size=1)  # the data is part of what is cached
        d["task"] = {"families": task.families, "weights": task.weights, "difficulty": asdict(task.difficulty)}
        d["build"] = BUILD_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("RESPEC_CACHE") or Path.home() / ".cache" / "respec")


def task_tokenizer() -> Tokenizer:
    with tempfile.TemporaryDirectory() as d:
        save_tokenizer_files(d, build_tokenizer())
        return Tokenizer.from_dir(d)


def encode_example(tok: Tokenizer, prompt: str, solution: str, eos_id: int) -> tuple[list[int], int]:
    """(prompt ids + response ids + eos, number of prompt ids)."""
    p = tok.encode(prompt)
    return p + tok.encode(solution, add_special_tokens=False) + [eos_id], len(p)


def _batches(tok: Tokenizer, task: ArithmeticTask, cfg: PretrainConfig, eos: int, pad: int):
    """Endless length-bucketed batches: pools of problems sorted by length, cut at a padded-token
    budget, served in shuffled order (no cross-example attention, little padding)."""
    rng = random.Random(cfg.seed)
    index, pool_size = 0, 1024
    while True:
        pool = [encode_example(tok, p.prompt, p.solution, eos) for p in task.problems(index, pool_size)]
        index += pool_size
        pool.sort(key=lambda e: len(e[0]))
        batches, cur = [], []
        for ex in pool:
            if cur and (len(cur) + 1) * len(ex[0]) > cfg.tokens_per_step:
                batches.append(cur)
                cur = []
            cur.append(ex)
        batches.append(cur)
        rng.shuffle(batches)
        for b in batches:
            T = max(len(s) for s, _ in b)
            x = torch.full((len(b), T), pad, dtype=torch.long)
            loss_mask = torch.zeros(len(b), T, dtype=torch.bool)
            for i, (seq, plen) in enumerate(b):
                x[i, : len(seq)] = torch.tensor(seq)
                loss_mask[i, plen - 1 : len(seq) - 1] = True  # positions that predict response tokens and eos
            yield x, loss_mask


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def pretrain(cfg: PretrainConfig, out_dir: Path, progress: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    tok = task_tokenizer()
    mcfg = cfg.model_config()
    model = Transformer(mcfg).init_weights(generator=torch.Generator().manual_seed(cfg.seed))
    model.train()
    task = ArithmeticTask(seed=cfg.task_seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    eos, pad = mcfg.eos_token_ids[0], mcfg.pad_token_id
    t0 = time.perf_counter()
    bar = ProgressBar(cfg.steps, "pretrain", progress)
    loss_ema = None
    batches = _batches(tok, task, cfg, eos, pad)
    for step in range(cfg.steps):
        x, mask = next(batches)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            logits = model(x[:, :-1]).logits
        loss = F.cross_entropy(logits.float()[mask[:, :-1]], x[:, 1:][mask[:, :-1]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.update(step + 1, f"loss {loss_ema:.3f}")
    bar.close()
    train_s = time.perf_counter() - t0
    model.eval()
    stats = {"train_seconds": round(train_s, 1), "final_loss": round(loss_ema or 0.0, 4),
             "parameters": mcfg.num_parameters(), "config": asdict(cfg)}
    stats.update(evaluate_pass_rate(model, tok, task, cfg.eval_problems))
    save_pretrained(model, out_dir, tokenizer=tok, extra_files={"respec_pretrain.json": json.dumps(stats, indent=2)})
    return stats


@torch.no_grad()
def evaluate_pass_rate(model: Transformer, tok: Tokenizer, task: ArithmeticTask, n: int, max_new_tokens: int = 400,
                       seed: int = 0) -> dict:
    """Held-out exact-answer pass rate at temperature 1 and 0 (engine decoding)."""
    from ..rollout.engine import Engine, Request
    from ..rollout.sampling import SamplingParams
    from .reward import exact_answer_reward

    problems = task.heldout(n)
    eos = tok.token_to_id(EOS)
    engine = Engine(model, eos_token_ids=[eos], max_batch=64, seed=seed)
    reqs = [Request(p.id, tuple(tok.encode(p.prompt)), 0, max_new_tokens) for p in problems]
    out = {}
    for name, temp in (("pass_rate_t1", 1.0), ("pass_rate_t0", 0.0)):
        res = engine.generate(reqs, SamplingParams(temperature=temp))
        texts = [tok.decode(r.token_ids) for r in res.rollouts]
        rewards = exact_answer_reward(texts, [p.answer for p in problems])
        out[name] = round(sum(rewards) / len(rewards), 4)
        if temp == 1.0:
            lens = sorted(len(r.token_ids) for r in res.rollouts)
            out["response_len_mean"] = round(sum(lens) / len(lens), 1)
            out["response_len_p10"] = lens[len(lens) // 10]
            out["response_len_p90"] = lens[(9 * len(lens)) // 10]
    return out


def ensure_builtin_actor(cfg: PretrainConfig | None = None, progress: bool | None = None, name: str = "actor") -> Path:
    """The cached built-in model's directory (`name`-<config hash>), building it first if missing."""
    cfg = cfg or PretrainConfig()
    out = Path(cfg.output) if cfg.output else cache_root() / f"{name}-{cfg.cache_key()}"
    if (out / "model.safetensors").is_file() and not cfg.force:
        return out
    if progress is None:
        progress = sys.stderr.isatty()
    print(f"building the built-in {name} in {out} (once; cached for later commands)", file=sys.stderr)
    stats = pretrain(cfg, out, progress=progress)
    print(f"built-in {name}: {json.dumps({k: v for k, v in stats.items() if k != 'config'})}", file=sys.stderr)
    return out


# The standalone draft LM of the two-model baseline (transformers' assisted generation, and respec's
# DraftModelDrafter): the built-in actor's recipe at a quarter of its per-token cost, same tokenizer.
DRAFT_LM = dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=384, steps=800)


def ensure_builtin_draft_lm(progress: bool | None = None) -> Path:
    """The cached small draft LM (built on first use: 47 s on 2 cores, session 11)."""
    return ensure_builtin_actor(PretrainConfig(**DRAFT_LM), progress=progress, name="draft-lm")


def run_pretrain_cli(cfg: PretrainConfig, args) -> int:
    path = ensure_builtin_actor(cfg, progress=True)
    meta = path / "respec_pretrain.json"
    print(f"built-in actor at {path}")
    if meta.is_file():
        print(meta.read_text())
    return 0
