"""`respec bench layer` on a tiny model: the short copy is the same network minus its last layer, and
the measurement runs, reports one record per batch and renders."""

from __future__ import annotations

import torch

from respec.bench import layer
from respec.models.rope import cos_sin
from respec.models.transformer import geometry

from .rl.conftest import tiny_lm


def test_the_short_copy_is_the_model_without_its_last_layer():
    model = tiny_lm(vocab=16, width=32)
    short = layer.without_last_layer(model)
    assert short.cfg.num_layers == model.cfg.num_layers - 1 == len(short.layers)
    assert len(model.layers) == model.cfg.num_layers  # the original is untouched
    tokens = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # run the full model's first L-1 layers by hand: the short copy must match it exactly
        x = model.embed(tokens)
        geo = geometry(2, 5, None, None, tokens.device)
        cos, sin = cos_sin(model.inv_freq, model.rope_scaling, geo.positions, model.dtype)
        for blk in model.layers[:-1]:
            x = blk(x, cos, sin, None, geo)
        expected = model.lm_head(model.norm(x))
        assert torch.equal(short(tokens).logits, expected)
        assert not torch.allclose(model(tokens).logits, expected)  # the last layer does change the output


def test_measure_runs_and_renders():
    model = tiny_lm(vocab=16, width=32)
    records = layer.measure(model, [1, 3], new_tokens=3, prompt_len=4, reps=2)
    assert [r["batch_size"] for r in records] == [1, 3]
    for r in records:
        assert r["step_ms"] > 0 and r["step_ms_one_layer_less"] > 0 and r["layers"] == 2
        lo, hi = r["layer_share"]["ci95"]
        assert lo <= r["layer_share"]["median"] <= hi
    md = layer.render({"info": {"device_name": "cpu", "torch": "x", "threads": 1, "command": "test"}, "records": records})
    assert "| 3 | 2 |" in md
