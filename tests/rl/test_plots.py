"""`respec plot` and `respec compare` on tiny synthetic metrics.jsonl files."""

from __future__ import annotations

import json

import pytest

from respec.cli import main
from respec.rl import plots


def synthetic_run(path, steps=6, accept=1.0, speed=1.0):
    path.mkdir(parents=True)
    rows = [{"kind": "eval", "step": 0, "eval_n": 10, "eval_pass_rate_t0": 0.1, "eval_pass_rate_sampled": 0.1,
             "eval_pass_rate_sampled_se": 0.09, "eval_reward_mean_sampled": 0.1, "eval_s": 0.5}]
    for s in range(steps):
        gen = 0.6 / speed
        rows.append({"kind": "train", "step": s, "reward_mean": s / steps, "pass_rate": s / steps / 2,
                     "response_len_mean": 10 + s, "response_len_max": 20 + s, "time_generate_s": gen,
                     "time_reward_s": 0.05, "time_train_s": 0.3, "time_sync_s": 0.0,
                     "time_step_s": gen + 0.35, "spec_accept_len": accept, "kl_ref": None})
    rows.append({**rows[0], "step": steps, "eval_pass_rate_t0": 0.5, "eval_pass_rate_sampled": 0.4})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tr')  # torn tail
    return path


def test_plot_writes_the_pngs(tmp_path, capsys):
    run = synthetic_run(tmp_path / "run")
    assert main(["plot", str(run)]) == 0
    for name in ("reward.png", "response_length.png", "step_time.png", "acceptance.png"):
        assert (run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "no metrics file" in capsys.readouterr().err


def test_compare_writes_table_and_overlays(tmp_path):
    a = synthetic_run(tmp_path / "plain")
    b = synthetic_run(tmp_path / "spec", accept=2.5, speed=2.0)
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    table = (out / "compare.md").read_text()
    plain_row = next(line for line in table.splitlines() if line.startswith(f"| {a} "))
    spec_row = next(line for line in table.splitlines() if line.startswith(f"| {b} "))
    # final reward = last 10% of 6 steps = step 5; eval at the last evaluation; generation share 0.6/0.95
    assert "| 6 | 0.833 | 0.400 | 0.500 | 0.950 | 63% | 1.00 |" in plain_row
    assert "| 0.650 | 46% | 2.50 |" in spec_row
    assert (out / "reward.png").is_file() and (out / "eval.png").is_file()


def test_missing_matplotlib_is_a_clear_message(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(plots.PlotError, match="matplotlib is not installed"):
        plots.plot_run(synthetic_run(tmp_path / "run"))
