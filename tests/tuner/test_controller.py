"""The adaptive controller on synthetic cost and acceptance streams: on at small batches, off at
large ones, no oscillation, and it follows acceptance as it changes."""

from __future__ import annotations

from types import SimpleNamespace

from respec.tuner import AcceptanceModel, AdaptiveK, CostProfile

GRID = [1, 2, 4, 8, 16, 32, 64]


def cpu_like_profile() -> CostProfile:
    """Verify cost grows with batch x query tokens (as measured on this CPU: q=5 costs ~1.2x q=1 at
    batch 1 and ~3x at batch 64); a drafter step costs ~12% of a plain step."""
    verify = {B: {q: 0.004 + 0.00015 * B * q + 0.0002 * q for q in range(1, 10)} for B in GRID}
    draft = {B: 0.12 * verify[B][1] for B in GRID}
    return CostProfile(GRID, verify, draft)


def rounds(controller: AdaptiveK, alpha: float, n: int, B: int, k_seen: int = 8):
    """Feed n rounds whose drafts are accepted i.i.d. with probability alpha (expected counts)."""
    for _ in range(n):
        k = controller.choose(B)
        kk = max(k, k_seen)  # also report deep positions so the model learns them
        drafted = [B] * kk
        accepted = [round(B * alpha ** (j + 1)) for j in range(kk)]
        controller.observe(SimpleNamespace(k=kk, active=B, accepted_at=accepted, drafted_at=drafted))


def test_on_at_small_batches_off_at_large():
    c = AdaptiveK(cpu_like_profile())
    rounds(c, 0.8, 30, B=64)
    assert c.choose(1) >= 2  # the shallowest k within depth_margin of the best k
    assert AdaptiveK(cpu_like_profile(), acceptance=c.acceptance).best(64) == 0
    assert AdaptiveK(cpu_like_profile(), acceptance=c.acceptance).best(128) == 0


def test_poor_acceptance_turns_speculation_off_everywhere():
    c = AdaptiveK(cpu_like_profile())
    rounds(c, 0.1, 40, B=4)
    assert all(c.best(B) == 0 for B in GRID)


def test_follows_acceptance_as_it_changes():
    c = AdaptiveK(cpu_like_profile())
    rounds(c, 0.2, 40, B=2)
    low = c.best(2)
    rounds(c, 0.9, 80, B=2)
    assert c.best(2) > low


def count_switches(controller: AdaptiveK, B: int = 8, n: int = 200) -> int:
    """Acceptance alternating 0.4 / 0.8 every round, seen through a fast EMA (decay 0.3). Counts
    changes of the controller's decision; a probe (one iteration one draft deeper, or drafting where
    the decision is off) is an excursion from it, not a switch, and probes are counted apart."""
    switches, prev = 0, None
    controller.probe_count = 0
    for i in range(n):
        alpha = 0.4 if i % 2 else 0.8
        k = controller.choose(B)
        controller.observe(SimpleNamespace(k=8, active=B, accepted_at=[round(B * alpha ** (j + 1)) for j in range(8)],
                                           drafted_at=[B] * 8))
        if k != controller.current:  # a probe: the decision itself is unchanged
            controller.probe_count += 1
            continue
        switches += prev is not None and k != prev
        prev = k
    return switches


def test_no_oscillation_under_noisy_acceptance():
    undamped = AdaptiveK(cpu_like_profile(), acceptance=AcceptanceModel(decay=0.3), min_dwell=0, switch_margin=0.0,
                         shallow_margin=0.0, depth_margin=0.0)
    damped = AdaptiveK(cpu_like_profile(), acceptance=AcceptanceModel(decay=0.3), min_dwell=4, switch_margin=0.05)
    assert count_switches(undamped) > 100  # the stream really does flip the best choice
    assert count_switches(damped) <= 3
    assert damped.probe_count <= 200 // damped.explore_every  # and the probes are rare excursions


def test_rollout_shrinking_batch_turns_speculation_on_as_rows_finish():
    learned = AdaptiveK(cpu_like_profile())
    rounds(learned, 0.8, 20, B=8)
    c = AdaptiveK(cpu_like_profile(), acceptance=learned.acceptance)  # a new rollout starts at 64 rows
    ks = [c.choose(B) for B in [64] * 5 + [32] * 5 + [8] * 5 + [2] * 5 + [1] * 5]
    assert ks[0] == 0 and ks[-1] >= 2  # deeper k predict within depth_margin at 1 row: the shallowest of them
    assert ks == sorted(ks)  # monotone as the batch shrinks: no flip-flopping


def test_decisions_are_deterministic_and_state_round_trips():
    a, b = AdaptiveK(cpu_like_profile()), AdaptiveK(cpu_like_profile())
    rounds(a, 0.7, 25, B=4)
    rounds(b, 0.7, 25, B=4)
    assert a.decisions == b.decisions
    m = AcceptanceModel()
    m.load_state(a.acceptance.state())
    assert [m.alpha(j) for j in range(8)] == [a.acceptance.alpha(j) for j in range(8)]
    p = CostProfile.from_dict(cpu_like_profile().to_dict())
    assert p.verify_cost(3, 4) == cpu_like_profile().verify_cost(3, 4)


def steep_profile() -> CostProfile:
    """Each extra verified token costs 1.5 ms on top of a 4 ms step; a drafter step 1 ms. Under the
    default prior (alpha 0.6) no k beats plain decoding at batch 1; with alpha 0.9, k = 2 does (~1.2x)."""
    verify = {B: {q: 0.004 + 0.0015 * (q - 1) * B for q in range(1, 10)} for B in GRID}
    return CostProfile(GRID, verify, {B: 0.001 for B in GRID})


def drive(c: AdaptiveK, n: int, alpha: float = 0.9, seed: int = 0) -> list[int]:
    """n iterations at batch 1 against a drafter whose drafts are accepted i.i.d. with prob. alpha."""
    import random

    rng, ks = random.Random(seed), []
    for _ in range(n):
        k = c.choose(1)
        ks.append(k)
        if k:
            run = 0
            while run < k and rng.random() < alpha:
                run += 1
            c.observe(SimpleNamespace(k=k, active=1, accepted_at=[int(j < run) for j in range(k)], drafted_at=[1] * k))
    return ks


def test_probing_finds_speculation_that_the_prior_rules_out():
    assert AdaptiveK(steep_profile()).best(1) == 0  # the prior alone says off
    c = AdaptiveK(steep_profile())
    ks = drive(c, 400)
    assert ks[:7] == [0] * 7 and ks[7] == c.probe_k  # the first probe, on schedule
    assert c.current > 0 and ks[-50:] == [c.current] * 50  # it found a paying k and settled on it
    never = AdaptiveK(steep_profile(), probe_every=10**9)  # without exploration it stays off forever
    assert set(drive(never, 400)) == {0}


def test_probing_stops_once_acceptance_is_known_and_never_happens_where_nothing_can_pay():
    c = AdaptiveK(steep_profile())
    ks = drive(c, 600, alpha=0.05)  # a useless drafter: probe, learn, stay off
    probes = sum(1 for k in ks if k)
    assert c.current == 0 and probes == c.min_evidence and set(ks[-200:]) == {0}
    big = AdaptiveK(steep_profile())
    assert all(big.choose(64) == 0 for _ in range(200))  # even all-accepted drafts cannot pay at 64


def test_profile_noise_cannot_make_more_work_cheaper():
    from respec.tuner.profile import _monotone

    noisy = CostProfile([1, 2, 4], {1: {1: 4.0, 2: 5.2, 3: 4.6}, 2: {1: 5.8, 2: 4.9, 3: 6.0}, 4: {1: 7.9, 2: 5.4, 3: 5.6}},
                        {1: 1.2, 2: 1.1, 4: 1.5})
    p = _monotone(noisy)
    for B in (1, 2, 4):
        assert [p.verify[B][q] for q in (1, 2, 3)] == sorted(p.verify[B][q] for q in (1, 2, 3))
    for q in (1, 2, 3):
        assert [p.verify[B][q] for B in (1, 2, 4)] == sorted(p.verify[B][q] for B in (1, 2, 4))
    assert p.verify[2][2] == 5.8 and p.draft[2] == 1.2


def test_near_ties_go_to_the_shallower_draft():
    """Flat verify costs (batch 1-2 on this CPU) make k = 3, 4, 5 predict within a few percent of each
    other; the controller takes the shallowest of the near-equals, and a clearly better deep draft
    still wins."""
    verify = {B: {q: 0.005 + (0.0 if q == 1 else 0.001) for q in range(1, 10)} for B in GRID}
    draft_k = {B: {k: 0.0006 * k for k in range(1, 9)} for B in GRID}
    prof = CostProfile(GRID, verify, {B: 0.0006 for B in GRID}, draft_k=draft_k)
    acc = AcceptanceModel(max_k=8)
    acc.accepted, acc.reached = [0.75 * 1000] * 3 + [0.6 * 8] * 5, [1000] * 3 + [8] * 5  # deep positions: prior only
    c = AdaptiveK(prof, acceptance=acc)
    thr = [c.predicted_throughput(2, k) for k in range(9)]
    top = max(range(9), key=lambda k: thr[k])
    assert top > 3 and thr[top] < 1.05 * thr[3]  # the raw argmax is deeper, by less than the margin
    assert c.best(2) == min(k for k in range(1, 9) if thr[k] * (1 + c.depth_margin) >= thr[top])
    assert c.best(2) <= 3
    greedy = AdaptiveK(prof, acceptance=acc, shallow_margin=0.0, depth_margin=0.0)
    assert greedy.best(2) == top


def flat_profile() -> CostProfile:
    """Each extra verified token costs 35% of a 10 ms step at any batch; a 4 ms round overhead. k = 3
    gains ~25% over plain at acceptance 0.85 and loses at 0.62."""
    flat = {B: {q: 0.01 * (1 + 0.35 * (q - 1)) for q in range(1, 10)} for B in GRID}
    return CostProfile(GRID, flat, {B: 0.0005 for B in GRID}, round_overhead={B: 0.004 for B in GRID})


def seen(alpha: float, rows: int = 500) -> AcceptanceModel:
    """An acceptance model that has seen `rows` rows accepting alpha at every position."""
    acc = AcceptanceModel()
    acc.accepted, acc.reached, acc.observed = [alpha * rows] * 8, [float(rows)] * 8, rows
    return acc


def run_at(c: AdaptiveK, n: int, B: int, alpha: float) -> list[int]:
    """n iterations at B rows; speculative ones report drafts accepted at alpha (expected counts)."""
    ks = []
    for _ in range(n):
        k = c.choose(B)
        ks.append(k)
        if k:
            c.observe(SimpleNamespace(k=k, active=B, accepted_at=[round(B * alpha ** (j + 1)) for j in range(k)],
                                      drafted_at=[B] * k))
    return ks


def test_exploration_corrects_an_estimate_learned_only_in_the_tail():
    """Acceptance learned at small batches (long, hard responses: alpha 0.62) says k=3 cannot pay at
    32 rows; the full batch's drafts are accepted at 0.85, where k=3 gains ~25%. Periodic probes at
    32 rows measure that and switch speculation on; without exploration (explore_every 0) it stays off."""
    prof = flat_profile()

    def tail_biased(**kw) -> AdaptiveK:
        return AdaptiveK(prof, acceptance=seen(0.62), **{"explore_every": 32, **kw})

    assert tail_biased().best(32) == 0
    explored = tail_biased()
    ks = run_at(explored, 1000, B=32, alpha=0.85)  # (depth probes also correct positions 2-3, learned at 0.62)
    # settled: the last 100 iterations draft the current k, or one deeper in a rare depth probe
    assert explored.current >= 2 and set(ks[-100:]) <= {explored.current, explored.current + 1}
    assert sum(k != explored.current for k in ks[-100:]) <= 100 // explored.explore_every + 1
    assert sum(1 for k in ks[:64] if k) <= 2  # probes are rare: every explore_every-th iteration
    never = tail_biased(explore_every=0)
    assert set(run_at(never, 1000, B=32, alpha=0.85)) == {0}


def test_a_long_small_batch_tail_does_not_erase_what_the_full_batch_showed():
    """A rollout: 10 rounds of 32 rows accepting 0.85, then a 60-round tail of one row accepting 0.62
    (long, hard responses). History is discounted per row, so the estimate stays near the mix of rows it
    saw (~0.77) and the next rollout's full batch speculates; discounting per round (0.95 per round
    keeps 5% after 60 rounds) would leave ~0.67 and keep 32 rows on plain decoding."""
    prof = flat_profile()
    acc = AcceptanceModel()
    for B, alpha, n in [(32, 0.85, 10), (1, 0.62, 60)]:
        for i in range(n):
            k = 3
            if B == 1:  # one row: accept a run of length ~ geometric(alpha), deterministic pattern
                run = next((j for j in range(k) if (i * 7 + j * 3) % 100 >= alpha * 100), k)
                acc.update([int(j < run) for j in range(k)], [1] * k)
            else:
                acc.update([round(B * alpha ** (j + 1)) for j in range(k)], [B] * k)
    assert 0.74 < acc.alpha(0) < 0.86
    assert AdaptiveK(prof, acceptance=acc).best(32) >= 2


def test_plain_iterations_pay_their_own_overhead():
    """At 16 rows the best draft is predicted ~3.5% ahead of plain decoding priced as a bare forward,
    inside the switch margin: plain stays. The engine's bookkeeping around every iteration (10% of
    the forward, as measured at 16 rows on this CPU), charged to plain iterations and speculative
    rounds alike, weighs more on the many cheap plain iterations and puts speculation ahead."""
    verify = {B: {q: 0.006 * (1 + 0.45 * (q - 1)) for q in range(1, 10)} for B in GRID}
    acc = AcceptanceModel()
    acc.accepted, acc.reached = [0.75 * 1000] * 8, [1000.0] * 8
    bare = CostProfile(GRID, verify, {B: 0.0005 for B in GRID}, round_overhead={B: 0.001 for B in GRID})
    with_iter = CostProfile(GRID, verify, {B: 0.0005 for B in GRID}, round_overhead={B: 0.001 for B in GRID},
                            iteration_overhead={B: 0.0006 for B in GRID})
    c_bare, c_iter = AdaptiveK(bare, acceptance=acc), AdaptiveK(with_iter, acceptance=acc)
    gain = max(c_bare.predicted_throughput(16, k) for k in range(1, 9)) / c_bare.predicted_throughput(16, 0)
    assert 1.0 < gain < 1.05
    assert c_bare.choose(16) == 0
    assert c_iter.profile.plain_cost(16) == 0.0066
    assert c_iter.choose(16) >= 1


def test_the_tail_is_judged_by_its_own_acceptance():
    """10 rounds of 32 rows accepting 0.9, then a 64-round one-row tail accepting 0.35 (the long,
    hard responses). Acceptance kept per batch-size cell sends the tail to plain decoding and keeps
    the full batch speculating; the pooled estimate (~0.73, mostly the full batch's) keeps the tail
    speculating too."""
    def feed(c: AdaptiveK, B: int, alpha: float, n: int, k: int = 3) -> None:
        for i in range(n):
            if B == 1:  # one row: a deterministic accept run whose frequency is ~alpha per position
                run = next((j for j in range(k) if (i * 7 + j * 3) % 100 >= alpha * 100), k)
                c.observe(SimpleNamespace(k=k, active=1, accepted_at=[int(j < run) for j in range(k)], drafted_at=[1] * k))
            else:
                c.observe(SimpleNamespace(k=k, active=B, accepted_at=[round(B * alpha ** (j + 1)) for j in range(k)],
                                          drafted_at=[B] * k))

    cells, pooled = AdaptiveK(flat_profile()), AdaptiveK(flat_profile(), cell_evidence=10**9)
    for c in (cells, pooled):
        feed(c, 32, 0.9, 10)
        feed(c, 1, 0.35, 64)
    assert cells.acceptance_at(1).alpha(0) < 0.45 < 0.7 < cells.acceptance_at(32).alpha(0)
    assert cells.best(1) == 0 and cells.best(32) >= 2
    assert pooled.best(1) >= 2  # the broken variant: the tail looks like the full batch


def context_profile() -> CostProfile:
    """64 rows, as on this CPU: a plain forward reads the whole KV cache, so it costs more at a long
    context (attention ~ rows x context), while a 4-token verify is matmul-bound and barely moves."""
    def table(n: int) -> dict:
        return {B: {q: 0.002 + 0.0001 * B * q + 0.0000004 * B * n for q in range(1, 10)} for B in GRID}
    tables = {n: table(n) for n in (32, 128, 384)}
    return CostProfile(GRID, tables[128], {B: 0.00002 * B for B in GRID}, context=128, verify_by_context=tables)


def test_costs_follow_the_context_between_and_beyond_the_profiled_ones():
    p = context_profile()
    assert p.contexts == [32, 128, 384]
    assert p.verify_cost(64, 1) == p.verify_cost(64, 1, 128)  # 0 = the reference context
    mid = p.verify_cost(64, 1, 80)
    assert abs(mid - (p.verify_cost(64, 1, 32) + p.verify_cost(64, 1, 128)) / 2) < 1e-12  # linear in n
    assert p.verify_cost(64, 1, 10) == p.verify_cost(64, 1, 32)  # clamped below the shortest
    assert abs(p.verify_cost(64, 1, 640) - (0.002 + 0.0064 + 0.0000004 * 64 * 640)) < 1e-12  # linear above
    again = CostProfile.from_dict(p.to_dict())  # what checkpoints and the cache store
    assert again.verify_cost(64, 4, 200) == p.verify_cost(64, 4, 200) and again.context == 128
    # the controller's memoized totals interpolate exactly as the per-term costs do
    for B in (1, 3, 64, 100):
        for n in (0, 10, 32, 80, 128, 300, 384, 640):
            costs = p.round_costs(B, n)
            assert abs(costs[0] - p.plain_cost(B, n)) < 1e-12
            assert all(abs(costs[k] - p.spec_round_cost(B, k, n)) < 1e-12 for k in range(1, p.max_k + 1))


def test_large_batches_speculate_only_where_the_context_makes_plain_decoding_expensive():
    """At 64 rows the same acceptance makes k >= 1 pay at a 384-token context and not at 32 tokens;
    a controller that ignores the context (the broken variant: every context priced at the
    profile's reference 128) decides the same at both."""
    acc = AcceptanceModel()
    acc.accepted, acc.reached = [0.8 * 1000] * 8, [1000.0] * 8
    c = AdaptiveK(context_profile(), acceptance=acc)
    assert c.best(64, context=32) == 0
    assert c.best(64, context=384) >= 1
    blind = [c.best(64, context=0) for _ in (32, 384)]
    assert blind[0] == blind[1]
    fresh = AdaptiveK(context_profile(), acceptance=acc)
    assert fresh.choose(64, 32) == 0 and AdaptiveK(context_profile(), acceptance=acc).choose(64, 384) >= 1


def test_probes_back_off_where_they_keep_confirming_plain_decoding():
    """64 rows that stay off: each probe drafts k = 3 (and pays the drafter's catch-up). Where the
    probe's acceptance keeps saying plain is right, the interval doubles up to explore_max_every; the
    broken variant without backoff probes every explore_every iterations for ever."""
    prof = flat_profile()

    def run(c: AdaptiveK, n: int = 3000, alpha: float = 0.62) -> list[int]:
        return run_at(c, n, B=64, alpha=alpha)

    def fresh(**kw) -> AdaptiveK:
        return AdaptiveK(prof, acceptance=seen(0.62), **kw)

    assert fresh().predicted_throughput(64, 3) >= fresh().explore_floor * fresh().predicted_throughput(64, 0)
    backed_off, flat = run(fresh()), run(fresh(explore_max_every=32))
    assert set(backed_off) | set(flat) == {0, 3}
    assert sum(map(bool, flat)) == 3000 // 32
    assert sum(map(bool, backed_off)) <= 7  # 32, 64, 128, 256, 512, 1024, 2048 ...
    # a probe that switches speculation on resets the interval (here: acceptance jumps to 0.9)
    c = fresh()
    run(c, 1500)
    cell = c._grid_cell(64)
    assert c.explore_intervals == {cell: c.explore_max_every}
    for i in range(4200):  # a probe every 1024 iterations now: a few to see it
        run(c, 1, alpha=0.92)
        if c.current > 0:
            break
    assert c.current > 0 and cell not in c.explore_intervals  # the probe that turned it on reset the interval
    ks = run(c, 200, alpha=0.92)
    assert set(ks[-50:]) <= {c.current, c.current + 1}  # it stays on (depth probes aside)


def test_a_new_batch_size_regime_is_decided_afresh_not_held_by_hysteresis():
    """A rollout's small-batch tail leaves k = 1 chosen; the next rollout starts at 64 rows, where
    plain decoding is predicted 4.8% ahead of k = 1: inside the switch margin, so hysteresis alone
    would keep k = 1 there. Crossing into another grid cell decides afresh."""
    acc = seen(0.8, rows=1000)
    c = AdaptiveK(cpu_like_profile(), acceptance=acc, current=1, last_batch=2, dwell=1)  # the tail's choice
    gain = c.predicted_throughput(64, 0) / c.predicted_throughput(64, 1)
    assert 1.0 < gain < 1 + c.switch_margin
    assert c.choose(64) == 0
    # and at a steady batch size the margin still holds a choice against a small predicted gain
    held = AdaptiveK(cpu_like_profile(), acceptance=acc, current=1, last_batch=64, dwell=10)
    assert held.choose(64) == 1


def test_probe_backoff_is_kept_per_batch_size_cell():
    """Every rollout ends in a one-row tail that speculates; that must not reset the backoff of the
    64-row cell, whose probes keep confirming plain decoding."""
    c = AdaptiveK(flat_profile(), acceptance=seen(0.62))
    c.by_cell[c._grid_cell(1)] = seen(0.97)  # the tail's own cell accepts nearly everything: it speculates
    probes_at_64, tail_ks = 0, []
    for rollout in range(12):
        probes_at_64 += sum(map(bool, run_at(c, 200, B=64, alpha=0.62)))  # 64 rows, off; probes see 0.62
        for _ in range(20):  # the one-row tail
            k = c.choose(1)
            tail_ks.append(k)
            if k:
                c.observe(SimpleNamespace(k=k, active=1, accepted_at=[1] * k, drafted_at=[1] * k))
    assert min(tail_ks) > 0
    assert c.explore_intervals.get(c._grid_cell(64)) == c.explore_max_every
    assert probes_at_64 <= 8  # vs 2400 / 32 = 75 without backoff


def test_depth_probes_correct_a_low_estimate_of_deeper_positions(monkeypatch):
    """Position 1 is known (0.85) but positions 2+ were learned low (0.5, a few unlucky rows), so
    k = 1 is chosen at 4 rows; the drafter really accepts 0.85 everywhere, where k = 3 gains ~19% over k = 1.
    Drafting at k = 1 never measures position 2: only a probe one draft deeper can. With depth
    probes the controller moves deeper; the broken variant without them stays at k = 1 for good."""
    def early() -> AdaptiveK:
        acc = seen(0.85)
        acc.accepted[1:] = [0.5 * 40] * 7
        acc.reached[1:] = [40.0] * 7
        return AdaptiveK(cpu_like_profile(), acceptance=acc)

    c = early()
    assert c.best(4) == 1
    truth = seen(0.85)
    assert c.predicted_throughput(4, 3, truth) > 1.1 * c.predicted_throughput(4, 1, truth)
    ks = run_at(c, 800, B=4, alpha=0.85)
    assert c.current >= 2 and sum(k == 1 for k in ks[-200:]) == 0
    probes = sum(k == c.current + 1 for k in ks[-200:])
    assert probes <= 200 // c.explore_every + 1  # probes stay rare ...
    assert c.explore_intervals[c._grid_cell(4)] > c.explore_every  # ... and back off once they confirm the choice

    stuck = early()
    monkeypatch.setattr(stuck, "_should_deepen", lambda B, context=0: False)
    assert set(run_at(stuck, 800, B=4, alpha=0.85)) == {1}
