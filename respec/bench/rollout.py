"""`respec bench rollout`: plain vs speculative decoding on the built-in actor and its drafter.

Part 1, fixed active batch (stop tokens ignored, every row generates `new_tokens`; the prompts are
task problems whose solutions are at least that long, see long_problems): for each
temperature, batch size and k, plain and speculative runs are interleaved (protocol.py); we report
tokens/s, the speedup with its bootstrap interval, the mean acceptance length tau (tokens emitted
per row per verify round), acceptance per draft position, and the speedup *predicted* from the
measured acceptance and separately profiled costs:

    predicted(B, k) = tau(B, k) * C_verify(B, 1) / (k * C_draft(B) + C_verify(B, k+1))

Part 2, whole long-tailed rollouts of task prompts (real stops, the RL setting) at temperature 1:
wall-clock speedup of each static k over plain.
Part 3, the transformers baselines at batch 1: `generate` and assisted generation with a
standalone draft model (transformers supports batch 1 only for that).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
from pathlib import Path

import torch

from ..models import load_pretrained
from ..rollout.engine import Engine, Request, StaticK
from ..rollout.sampling import SamplingParams
from ..tuner.profile import measure_profile
from .protocol import device_info, interleaved, ratio_ci, timed, write_results


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="actor dir (default: the built-in actor)")
    p.add_argument("--drafter", default="", help="drafter dir, or builtin:eagle (default) | builtin:lm (the built-in actor's cached drafters)")
    p.add_argument("--draft-model", default="builtin",
                   help="standalone draft LM (HF dir) for the transformers assisted baseline; 'builtin' = the cached "
                        "small draft LM (built on first use); '' = skip assisted generation")
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--ks", default="1,2,3,4,5,6,7,8")
    p.add_argument("--temperatures", default="1.0,0.0")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rollout-prompts", type=int, default=8)
    p.add_argument("--rollout-group", type=int, default=8)
    p.add_argument("--rollout-max-new", type=int, default=400)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--out", default="benchmarks/results/rollout")


def run(args: argparse.Namespace) -> int:
    from ..generate import builtin_actor_dir, load_drafter, resolve_drafter

    model_dir = Path(args.model) if args.model else builtin_actor_dir()
    if not args.skip_hf:  # resolved (built, or checked) before the long measurements
        args.draft_model = _draft_model_dir(args.draft_model)
    drafter_dir = Path(resolve_drafter(args.drafter, model_dir, builtin_actor=not args.model))
    pre = load_pretrained(model_dir)
    model, tok = pre.model, pre.tokenizer
    drafter = load_drafter(drafter_dir, model, actor_path=str(model_dir))
    ks = [int(k) for k in args.ks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    from ..tasks import ArithmeticTask

    task = ArithmeticTask(seed=12345)
    problems = long_problems(task, tok, max(batches), args.new_tokens)
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the same cost profile the adaptive controller uses (tuner/profile.py)
    costs = measure_profile(model, drafter, batch_sizes=tuple(batches), max_k=max(ks))
    records = []
    for temp in [float(t) for t in args.temperatures.split(",")]:
        sampling = SamplingParams(temperature=temp)
        for B in batches:
            reqs = [Request(p.id, tuple(tok.encode(p.prompt)), 0, args.new_tokens) for p in problems[:B]]
            engines = {0: Engine(model, eos_token_ids=[], max_batch=B)}
            for k in ks:
                engines[k] = Engine(model, eos_token_ids=[], drafter=drafter, policy=StaticK(k), max_batch=B)
            stats: dict[int, list] = {k: [] for k in engines}

            def runner(k):
                def go():
                    res = engines[k].generate(reqs, sampling)
                    stats[k].append(res)
                    return res.tokens
                return lambda: timed(go)

            res = interleaved({str(k): runner(k) for k in engines}, reps=args.reps)
            for k in ks:
                r = ratio_ci(res[str(k)], res["0"])
                runs = stats[k][1:]  # drop the warm-up
                tau = statistics.mean(x.mean_accept_len for x in runs)
                acc_at = [sum(sum(rd.accepted_at[j] for rd in x.rounds if len(rd.accepted_at) > j) for x in runs) /
                          max(1, sum(sum(rd.drafted_at[j] for rd in x.rounds if len(rd.drafted_at) > j) for x in runs))
                          for j in range(k)]
                pred = tau * costs.plain_cost(B) / costs.spec_round_cost(B, k)  # the controller's model
                rec = {"temperature": temp, "batch_size": B, "k": k,
                       "tokens_per_s_plain": statistics.median(res["0"]), "tokens_per_s_spec": statistics.median(res[str(k)]),
                       "speedup": r.median, "speedup_ci95": [r.lo, r.hi], "mean_accept_len": tau,
                       "accept_rate_per_position": acc_at, "predicted_speedup": pred,
                       "measured_over_predicted": r.median / pred, "reps": args.reps, "device": device_info()["device_name"],
                       "command": device_info()["command"]}
                records.append(rec)
                print(f"T={temp} B={B:2d} k={k}: plain {rec['tokens_per_s_plain']:7.0f} spec {rec['tokens_per_s_spec']:7.0f} tok/s "
                      f"speedup {r.fmt()} tau {tau:.2f} predicted {pred:.2f}x", flush=True)
    rollouts = whole_rollouts(model, tok, drafter, task, ks, args)
    hf = {} if args.skip_hf else hf_baselines(model_dir, args, tok, task)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info = device_info()
    payload = {"info": info, "model": str(model_dir), "drafter": str(drafter_dir), "drafter_kind": type(drafter).__name__,
               "new_tokens": args.new_tokens,
               "records": records, "costs_s": costs.to_dict(), "whole_rollouts": rollouts,
               "hf_baselines": hf, "peak_rss_mb": round(peak_mb, 1), "rss_before_mb": round(peak0 / 1024, 1)}
    md = render_table(payload)
    write_results(Path(args.out), payload, md)
    plot_rollout(payload, Path(args.out).with_suffix(".png"))
    print(md)
    return 0


def long_problems(task, tok, n: int, min_tokens: int) -> list:
    """The first n task problems whose reference solution has at least min_tokens tokens: a fixed
    active batch decodes real solution text for its whole budget (stops are ignored there), not
    the arbitrary text a model writes after it would have stopped, which no drafter is trained on."""
    out, i = [], 0
    while len(out) < n:
        for p in task.problems(i, 256):
            if len(tok.encode(p.solution)) >= min_tokens and len(out) < n:
                out.append(p)
        i += 256
        if i > 100_000:
            raise ValueError(f"fewer than {n} task problems have solutions of {min_tokens}+ tokens")
    return out


def whole_rollouts(model, tok, drafter, task, ks, args) -> dict:
    """Long-tailed rollouts (real stops): G samples of each prompt, plain vs each static k, T=1."""
    problems = task.problems(1000, args.rollout_prompts)
    reqs = [Request(p.id, tuple(tok.encode(p.prompt)), s, args.rollout_max_new)
            for p in problems for s in range(args.rollout_group)]
    eos = [tok.eos_token_id]
    engines = {0: Engine(model, eos_token_ids=eos, max_batch=len(reqs))}
    for k in ks:
        engines[k] = Engine(model, eos_token_ids=eos, drafter=drafter, policy=StaticK(k), max_batch=len(reqs))
    walls: dict[int, list[float]] = {k: [] for k in engines}
    taus: dict[int, list[float]] = {k: [] for k in engines}
    lengths = []

    def runner(k):
        def go():
            res = engines[k].generate(reqs, SamplingParams(1.0))
            walls[k].append(res.wall_s)
            taus[k].append(res.mean_accept_len)
            if k == 0:
                lengths.extend(len(r.token_ids) for r in res.rollouts)
            return res.wall_s
        return go

    interleaved({str(k): runner(k) for k in engines}, reps=args.reps)
    out = {"rows": len(reqs), "max_new_tokens": args.rollout_max_new}
    lens = sorted(lengths)
    out["response_len"] = {"mean": statistics.mean(lens), "p10": lens[len(lens) // 10], "p90": lens[9 * len(lens) // 10]}
    for k in ks:
        r = ratio_ci(walls[0][1:], walls[k][1:])  # wall-time ratio plain / spec = speedup
        out[f"k{k}"] = {"speedup": r.median, "ci95": [r.lo, r.hi], "mean_accept_len": statistics.mean(taus[k][1:])}
    out["plain_wall_s"] = statistics.median(walls[0][1:])
    print("whole rollouts:", json.dumps(out), flush=True)
    return out


def hf_baselines(model_dir: Path, args, tok, task) -> dict:
    """transformers generate and assisted generation at batch 1 (T=1, top_k=0), interleaved with ours."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    draft_dir = Path(args.draft_model) if args.draft_model else None
    assistant = None
    if draft_dir is not None:
        assistant = transformers.AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32,
                                                                      attn_implementation="sdpa").eval()
    p = task.problems(0, 1)[0]
    ids = torch.tensor([tok.encode(p.prompt)])
    n = args.new_tokens

    def hf_gen(**kw):
        def go():
            with torch.no_grad():
                out = hf.generate(ids, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=n,
                                  min_new_tokens=n, pad_token_id=0, attention_mask=torch.ones_like(ids), **kw)
            return out.shape[1] - ids.shape[1]
        return lambda: timed(go)

    runs = {"hf_generate": hf_gen()}
    if assistant is not None:
        runs["hf_assisted"] = hf_gen(assistant_model=assistant)
    ours = load_pretrained(model_dir).model
    engine = Engine(ours, eos_token_ids=[], max_batch=1)
    req = [Request(p.id, tuple(ids[0].tolist()), 0, n)]
    runs["respec_plain"] = lambda: timed(lambda: engine.generate(req, SamplingParams(1.0)).tokens)
    res = interleaved(runs, reps=args.reps)
    out = {name: statistics.median(v) for name, v in res.items()}
    for name in res:
        if name != "hf_generate":
            r = ratio_ci(res[name], res["hf_generate"])
            out[f"{name}_over_hf_generate"] = {"median": r.median, "ci95": [r.lo, r.hi]}
    print("hf baselines (batch 1, tok/s):", json.dumps(out), flush=True)
    return out


def render_table(payload: dict) -> str:
    info = payload["info"]
    kind = {"EagleDrafter": "EAGLE drafter", "DraftModelDrafter": "standalone draft LM"}.get(payload.get("drafter_kind"), "EAGLE drafter")
    lines = [f"# Rollout benchmark: plain vs speculative ({kind}), built-in actor\n", f"drafter: `{payload['drafter']}`\n",
             f"device: {info['device_name']}, torch {info['torch']}, threads {info['threads']}, fp32; "
             f"peak RSS {payload['peak_rss_mb']} MB\n", f"command: `{info['command']}`\n",
             "Fixed active batch, stop tokens ignored. Speedup = spec tok/s / plain tok/s, median of interleaved "
             "repetitions with bootstrap 95% interval; tau = tokens per row per verify round; predicted from tau and "
             "profiled costs.\n"]
    for temp in sorted({r["temperature"] for r in payload["records"]}, reverse=True):
        lines += [f"\n## temperature {temp}\n", "| batch | plain tok/s | best k | speedup (95% CI) | tau | predicted | all k: speedup |",
                  "|---|---|---|---|---|---|---|"]
        for B in sorted({r["batch_size"] for r in payload["records"]}):
            rs = [r for r in payload["records"] if r["temperature"] == temp and r["batch_size"] == B]
            best = max(rs, key=lambda r: r["speedup"])
            allk = " ".join(f"{r['k']}:{r['speedup']:.2f}" for r in rs)
            lines.append(f"| {B} | {best['tokens_per_s_plain']:.0f} | {best['k']} | {best['speedup']:.2f}x "
                         f"[{best['speedup_ci95'][0]:.2f}, {best['speedup_ci95'][1]:.2f}] | {best['mean_accept_len']:.2f} | "
                         f"{best['predicted_speedup']:.2f}x | {allk} |")
    w = payload["whole_rollouts"]
    lines += ["\n## Whole long-tailed rollouts (T=1, real stops)\n",
              f"{w['rows']} rows, max {w['max_new_tokens']} new tokens, response length mean {w['response_len']['mean']:.0f}, "
              f"p10 {w['response_len']['p10']}, p90 {w['response_len']['p90']}; plain wall {w['plain_wall_s']:.2f}s\n",
              "| k | speedup (95% CI) | tau |", "|---|---|---|"]
    for key, v in w.items():
        if key.startswith("k"):
            lines.append(f"| {key[1:]} | {v['speedup']:.2f}x [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}] | {v['mean_accept_len']:.2f} |")
    if payload.get("hf_baselines"):
        lines += ["\n## transformers baselines (batch 1, T=1, tok/s)\n", "```", json.dumps(payload["hf_baselines"], indent=1), "```"]
    return "\n".join(lines) + "\n"


def plot_rollout(payload: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    temps = sorted({r["temperature"] for r in payload["records"]}, reverse=True)
    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4), squeeze=False)
    for ax, temp in zip(axes[0], temps):
        for k in sorted({r["k"] for r in payload["records"]}):
            rs = sorted((r for r in payload["records"] if r["temperature"] == temp and r["k"] == k), key=lambda r: r["batch_size"])
            ax.plot([r["batch_size"] for r in rs], [r["speedup"] for r in rs], marker="o", label=f"k={k}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("active batch")
        ax.set_ylabel("speedup over plain")
        ax.set_title(f"temperature {temp}")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draft_model_dir(arg: str) -> str:
    if arg == "builtin":
        from ..tasks.pretrain import ensure_builtin_draft_lm

        return str(ensure_builtin_draft_lm())
    if arg and not (Path(arg) / "config.json").is_file():
        raise SystemExit(f"--draft-model {arg}: no config.json (not an HF checkpoint directory)")
    return arg
