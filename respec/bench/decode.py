"""Plain decoding throughput: respec's engine vs transformers `generate` on the same checkpoint.

Fixed active batch (every row generates exactly `new_tokens`, stop tokens ignored), same dtype,
SDPA attention in transformers and respec's own path in respec (SDPA, or for bf16 on CPU at 16+
rows the grouped eager form of models/transformer.py), sampling at temperature 1 with top_k=0 in both (transformers 5 otherwise
defaults to top_k=50). transformers is imported here only: the benchmark compares against it.

A third arm runs respec with its cached weight layouts switched off (models/linear.py: packed for
2+ rows, transposed for one fp32 row; `packed_off()` leaves plain `F.linear`, i.e. MKL, as
transformers uses), so the table also shows what the layouts buy.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ..models import linear, load_pretrained, parse_dtype
from ..rollout.engine import Engine, Request
from ..rollout.sampling import SamplingParams
from .protocol import device_info, interleaved, ratio_ci, timed, write_results


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="checkpoint dir (default: the built-in actor)")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/decode")


def run(args: argparse.Namespace) -> int:
    import transformers

    from ..generate import builtin_actor_dir

    model_dir = Path(args.model) if args.model else builtin_actor_dir()
    records = []
    for dtype_name in args.dtypes.split(","):
        dtype = parse_dtype(dtype_name)
        ours = load_pretrained(model_dir, dtype=dtype).model
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").eval()
        V = ours.cfg.vocab_size
        for B in [int(b) for b in args.batches.split(",")]:
            g = torch.Generator().manual_seed(B)
            prompts = torch.randint(3, V, (B, args.prompt_len), generator=g)
            reqs = [Request(str(i), tuple(prompts[i].tolist()), 0, args.new_tokens) for i in range(B)]
            engine = Engine(ours, eos_token_ids=[], max_batch=B)

            def run_ours() -> int:
                return engine.generate(reqs, SamplingParams(1.0)).tokens

            def run_unpacked() -> int:
                with linear.packed_off():
                    return engine.generate(reqs, SamplingParams(1.0)).tokens

            def run_hf() -> int:
                with torch.no_grad():
                    out = hf.generate(prompts, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      pad_token_id=0, attention_mask=torch.ones_like(prompts))
                return (out.shape[1] - args.prompt_len) * B

            res = interleaved({"respec": lambda: timed(run_ours), "unpacked": lambda: timed(run_unpacked),
                               "hf": lambda: timed(run_hf)}, reps=args.reps)
            r = ratio_ci(res["respec"], res["hf"])
            r_pack = ratio_ci(res["respec"], res["unpacked"])
            med = {arm: sorted(v)[len(v) // 2] for arm, v in res.items()}
            rec = {"dtype": dtype_name, "batch_size": B, "tokens_per_s_respec": med["respec"],
                   "tokens_per_s_respec_unpacked": med["unpacked"], "tokens_per_s_hf": med["hf"],
                   "speedup": r.as_dict(), "packed_over_unpacked": r_pack.as_dict(), "reps": args.reps}
            records.append(rec)
            print(f"{dtype_name:8s} batch {B:3d}: respec {med['respec']:8.0f} tok/s  unpacked {med['unpacked']:8.0f}  "
                  f"hf {med['hf']:8.0f} tok/s  ratio {r.fmt()}  packed/unpacked {r_pack.fmt()}", flush=True)
    info = device_info("cpu")
    lines = [f"# Plain decoding: respec vs transformers generate\n", f"device: {info['device_name']}, torch {info['torch']}, "
             f"transformers {info.get('transformers')}, threads {info['threads']}\n", f"command: `{info['command']}`\n",
             "`unpacked` = respec with its cached weight layouts (packed, transposed) off: plain F.linear (models/linear.py).\n",
             "| dtype | batch | respec tok/s | unpacked tok/s | HF tok/s | respec / HF (95% CI) | respec / unpacked (95% CI) |",
             "|---|---|---|---|---|---|---|"]
    for rec in records:
        s, p = rec["speedup"], rec["packed_over_unpacked"]
        lines.append(f"| {rec['dtype']} | {rec['batch_size']} | {rec['tokens_per_s_respec']:.0f} | "
                     f"{rec['tokens_per_s_respec_unpacked']:.0f} | {rec['tokens_per_s_hf']:.0f} | "
                     f"{s['median']:.2f}x [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}] | "
                     f"{p['median']:.2f}x [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}] |")
    write_results(Path(args.out), {"info": info, "model": str(model_dir), "new_tokens": args.new_tokens, "records": records},
                  "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
