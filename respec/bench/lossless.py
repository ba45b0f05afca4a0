"""`respec bench lossless`: the pooled losslessness test at scale, and its statistics.

The engine generates many ragged rows speculatively with an imperfect drafter; the target is then
teacher-forced over every finished sequence to get the exact transformed distribution behind each
emitted token. Tokens are scored per slot within their verify round by two Pearson chi-square
tests: a rank test (was the token the r-th most likely?) and a randomized probability-integral
transform in token-id order (exactly Uniform(0,1) for a correct sampler, 10 bins). The unit tests
(tests/rollout/test_engine_lossless.py) run this at ~5k tokens; the bench runs it at >= 10^6 tokens
over 20 seeds and checks that the p-values are themselves uniform (Kolmogorov-Smirnov).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from ..drafter import DraftModelDrafter
from ..models import ModelConfig, Transformer
from ..rollout.engine import Engine, Request, StaticK
from ..rollout.sampling import SamplingParams, transform
from .protocol import device_info, write_results

ALPHA = 1e-3  # significance level of every pooled test
V = 12
K = 3


def tiny_lm(seed: int, std: float = 0.25, vocab: int = V) -> Transformer:
    cfg = ModelConfig(arch="qwen2", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, tie_word_embeddings=False)
    return Transformer(cfg).init_weights(std=std, generator=torch.Generator().manual_seed(seed)).eval()


def perturbed(model: Transformer, noise: float, seed: int) -> Transformer:
    """A drafter that is close to, but not equal to, the target (acceptance well inside (0, 1))."""
    draft = Transformer(model.cfg).eval()
    draft.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return draft


def chi2_sf(x: float, df: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64)))


def pearson(observed: torch.Tensor, expected: torch.Tensor, min_expected: float = 5.0) -> float:
    """p-value of Pearson's statistic after merging tail cells until each expects >= min_expected."""
    obs, exp = [], []
    o_acc = e_acc = 0.0
    for o, e in zip(observed.tolist(), expected.tolist()):
        o_acc, e_acc = o_acc + o, e_acc + e
        if e_acc >= min_expected:
            obs.append(o_acc), exp.append(e_acc)
            o_acc = e_acc = 0.0
    if e_acc > 0 and exp:
        obs[-1] += o_acc
        exp[-1] += e_acc
    if len(exp) < 2:
        return 1.0
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return chi2_sf(stat, len(exp) - 1)


@torch.no_grad()
def teacher_forced(model: Transformer, rollouts, sampling: SamplingParams):
    """Per emitted token: (exact transformed target distribution (V,), token, slot, source, logprob)."""
    rows = []
    for r in rollouts:
        seq = torch.tensor(list(r.request.prompt_ids) + r.token_ids)
        logits = model(seq[None]).logits[0]  # (T, V)
        P = len(r.request.prompt_ids)
        probs = transform(logits[P - 1 : P - 1 + len(r.token_ids)].double(), sampling).probs
        for i, tok in enumerate(r.token_ids):
            rows.append((probs[i], tok, r.round_slots[i], r.sources[i], r.logprobs[i]))
    return rows


def pooled_pvalues(rows, seed: int = 0) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for slot in sorted({s for _, _, s, _, _ in rows}):
        sel = [(p, t) for p, t, s, _, _ in rows if s == slot]
        probs = torch.stack([p for p, _ in sel])  # (N, V)
        toks = torch.tensor([t for _, t in sel])
        # rank test
        order = probs.argsort(dim=-1, descending=True, stable=True)
        rank = (order == toks[:, None]).float().argmax(-1)
        expected = probs.gather(-1, order).sum(0)
        observed = torch.bincount(rank, minlength=probs.shape[-1]).double()
        out[f"rank@{slot}"] = pearson(observed, expected)
        # randomized PIT in token-id order
        cdf_before = probs.cumsum(-1).gather(-1, toks[:, None])[:, 0] - probs.gather(-1, toks[:, None])[:, 0]
        v = torch.rand(len(sel), generator=g, dtype=torch.float64)
        pit = cdf_before + v * probs.gather(-1, toks[:, None])[:, 0]
        bins = torch.bincount((pit * 10).clamp(0, 9.999).long(), minlength=10).double()
        out[f"pit@{slot}"] = pearson(bins, torch.full((10,), len(sel) / 10.0, dtype=torch.float64))
    return out


def make_requests(n_rows: int, max_new: int, seed: int = 0) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for i in range(n_rows):
        plen = 1 + int(torch.randint(1, 7, (1,), generator=g))
        prompt = tuple(torch.randint(0, V, (plen,), generator=g).tolist())
        reqs.append(Request(f"p{i}", prompt, 0, max_new))
    return reqs




def run_pooled(target, drafter, sampling, n_rows=256, max_new=24, eos=(), seed=7, k=K):
    eng = Engine(target, eos_token_ids=eos, drafter=drafter, policy=StaticK(k), max_batch=64, seed=seed)
    res = eng.generate(make_requests(n_rows, max_new, seed), sampling)
    return res, teacher_forced(target, res.rollouts, sampling)


def ks_uniform(pvalues: list[float]) -> float:
    """Kolmogorov-Smirnov p-value (asymptotic) of the sample against Uniform(0, 1)."""
    xs = sorted(pvalues)
    n = len(xs)
    d = max(max((i + 1) / n - x, x - i / n) for i, x in enumerate(xs))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    return max(0.0, min(1.0, 2 * sum((-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam) for j in range(1, 101))))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--tokens", type=int, default=1_000_000, help="total emitted tokens over all seeds")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--out", default="benchmarks/results/lossless")


def run(args: argparse.Namespace) -> int:
    sampling = SamplingParams(args.temperature, top_p=args.top_p)
    target = tiny_lm(0)
    drafter = DraftModelDrafter(perturbed(target, 0.08, 1))
    max_new = 24
    rows_per_seed = max(64, -(-args.tokens // (args.seeds * max_new)))  # ceil: at least --tokens in total
    per_seed, all_p = [], []
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        res, rows = run_pooled(target, drafter, sampling, n_rows=rows_per_seed, max_new=max_new, seed=1000 + seed)
        pv = pooled_pvalues(rows, seed=seed)
        gap = max(abs(lp - math.log(p[t].item())) for p, t, _, _, lp in rows)
        per_seed.append({"seed": 1000 + seed, "tokens": len(rows), "mean_accept_len": res.mean_accept_len,
                         "min_p": min(pv.values()), "pvalues": pv, "max_logprob_gap": gap})
        all_p.extend(pv.values())
        print(f"seed {1000 + seed}: {len(rows)} tokens, tau {res.mean_accept_len:.2f}, min p {min(pv.values()):.3g}, "
              f"log-prob gap {gap:.2e}", flush=True)
    total = sum(s["tokens"] for s in per_seed)
    ks = ks_uniform(all_p)
    payload = {"info": device_info(), "sampling": vars(args), "tokens": total, "k": K, "seconds": time.perf_counter() - t0,
               "per_seed": per_seed, "n_pvalues": len(all_p), "ks_uniform_p": ks,
               "fraction_below_alpha": sum(p < ALPHA for p in all_p) / len(all_p),
               "max_logprob_gap": max(s["max_logprob_gap"] for s in per_seed)}
    md = (f"# Pooled losslessness test at scale\n\n{total} speculative tokens (k={K}) over {args.seeds} seeds, "
          f"temperature {args.temperature}, top-p {args.top_p}, device {payload['info']['device_name']}\n\n"
          f"command: `{payload['info']['command']}`\n\n"
          f"- {len(all_p)} chi-square p-values (rank and PIT tests per round slot per seed); "
          f"fraction below {ALPHA}: {payload['fraction_below_alpha']:.4f}\n"
          f"- KS test of the p-values against Uniform(0,1): p = {ks:.3f}\n"
          f"- max |recorded log-prob - teacher-forced log-prob| (fp32): {payload['max_logprob_gap']:.2e}\n")
    write_results(Path(args.out), payload, md)
    print(md)
    return 0
