"""The cost profile's measurement: interleaved timing, and a profile the controller can use."""

from __future__ import annotations

from respec.bench.lossless import perturbed, tiny_lm
from respec.drafter import DraftModelDrafter
from respec.tuner import profile as P


def test_timings_are_interleaved_round_robin_after_one_warm_up_round():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    out = P._interleaved_times(fns, reps=3)
    assert calls == list("abc") * 4  # warm-up round + 3 timed rounds, one call of each per round
    assert set(out) == set("abc") and all(t >= 0 for t in out.values())


def test_measured_profile_covers_the_grid_and_never_gets_cheaper_with_more_work():
    target = tiny_lm(0)
    drafter = DraftModelDrafter(perturbed(target, 0.08, 1))
    prof = P.measure_profile(target, drafter, batch_sizes=(1, 2, 4), max_k=3, ctx=16, contexts=(8, 48), reps=2)
    assert sorted(prof.verify) == [1, 2, 4] and all(sorted(v) == [1, 2, 3, 4] for v in prof.verify.values())
    assert sorted(prof.draft) == [1, 2, 4] and sorted(prof.round_overhead) == [1, 2, 4]
    for B in (1, 2, 4):
        qs = [prof.verify[B][q] for q in (1, 2, 3, 4)]
        assert all(t > 0 for t in qs) and qs == sorted(qs)
    for q in (1, 2, 3, 4):
        bs = [prof.verify[B][q] for B in (1, 2, 4)]
        assert bs == sorted(bs)
    assert prof.max_k == 3 and prof.draft[1] > 0
    # the engine's bookkeeping around an iteration is charged to plain and speculative iterations alike
    assert sorted(prof.iteration_overhead) == [1, 2, 4] and all(t > 0 for t in prof.iteration_overhead.values())
    assert prof.plain_cost(2) == prof.verify[2][1] + prof.iteration_overhead[2]
    assert prof.spec_round_cost(2, 3) == (prof.draft_cost(2, 3) + prof.verify[2][4] + prof.round_overhead[2]
                                          + prof.iteration_overhead[2])
    assert P.CostProfile.from_dict(prof.to_dict()).plain_cost(4) == prof.plain_cost(4)
    # the verify table at each context (the reference one included), never cheaper at a longer one
    assert prof.contexts == [8, 16, 48] and prof.context == 16 and prof.verify_by_context[16] == prof.verify
    for B in (1, 2, 4):
        for q in (1, 2, 3, 4):
            by_n = [prof.verify_by_context[n][B][q] for n in (8, 16, 48)]
            assert all(t > 0 for t in by_n) and by_n == sorted(by_n)
    assert prof.plain_cost(4, 48) == prof.verify_by_context[48][4][1] + prof.iteration_overhead[4]
    assert P.CostProfile.from_dict(prof.to_dict()).plain_cost(4, 30) == prof.plain_cost(4, 30)


def test_whole_proposals_are_profiled_per_k_and_drive_the_round_cost():
    target = tiny_lm(0)
    drafter = DraftModelDrafter(perturbed(target, 0.08, 1))
    prof = P.measure_profile(target, drafter, batch_sizes=(1, 2), max_k=3, ctx=16, contexts=(), reps=2)
    for B in (1, 2):
        ks = [prof.draft_k[B][k] for k in (1, 2, 3)]
        assert all(t > 0 for t in ks) and ks == sorted(ks)
        assert prof.draft_cost(B, 3) == prof.draft_k[B][3]
        assert prof.spec_round_cost(B, 2) == (prof.draft_k[B][2] + prof.verify[B][3] + prof.round_overhead[B]
                                              + prof.iteration_overhead[B])
    again = P.CostProfile.from_dict(prof.to_dict())  # what checkpoints and the cache store
    assert again.draft_k == prof.draft_k
    assert prof.verify_by_context == {}  # one context: nothing to interpolate
    legacy = P.CostProfile.from_dict({k: v for k, v in prof.to_dict().items() if k != "draft_k"})
    assert legacy.draft_cost(2, 3) == 3 * prof.draft[2]  # older profiles: k one-step proposals



def test_a_cached_profile_is_reused_only_with_the_same_matmul_path(tmp_path, monkeypatch):
    from respec.models import linear

    target = tiny_lm(0)
    drafter = DraftModelDrafter(perturbed(target, 0.08, 1))
    kw = dict(batch_sizes=(1, 2), max_k=1, ctx=8, contexts=(8,), reps=1)
    P.load_or_measure(target, drafter, tmp_path, **kw)
    P.load_or_measure(target, drafter, tmp_path, **kw)  # same path: the cached file is reused
    assert len(list(tmp_path.glob("profile-*.json"))) == 1
    monkeypatch.setattr(linear, "_ENABLED", not linear._ENABLED)  # costs measured with the other kernels
    P.load_or_measure(target, drafter, tmp_path, **kw)
    assert len(list(tmp_path.glob("profile-*.json"))) == 2


def test_a_cached_profile_is_not_reused_for_a_drafter_of_another_size(tmp_path):
    """Two standalone draft LMs of one class but different depth cost differently per step: each
    gets its own cached profile (a shared one would feed the controller the other drafter's costs)."""
    from respec.models import ModelConfig, Transformer

    target = tiny_lm(0)
    shallow = Transformer(ModelConfig(arch="qwen2", vocab_size=target.cfg.vocab_size, hidden_size=64,
                                      intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2)).eval()
    kw = dict(batch_sizes=(1,), max_k=1, ctx=8, contexts=(8,), reps=1)
    P.load_or_measure(target, DraftModelDrafter(perturbed(target, 0.08, 1)), tmp_path, **kw)
    P.load_or_measure(target, DraftModelDrafter(shallow), tmp_path, **kw)
    assert len(list(tmp_path.glob("profile-*.json"))) == 2
    P.load_or_measure(target, DraftModelDrafter(perturbed(target, 0.2, 2)), tmp_path, **kw)  # same shape: reused
    assert len(list(tmp_path.glob("profile-*.json"))) == 2
