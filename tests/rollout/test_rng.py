"""Keyed counter-based uniforms: exact arithmetic, uniformity, independence, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from respec.rollout.rng import LANE_ACCEPT, LANE_DRAFT, LANE_SAMPLE, request_key, uniforms

M32 = 0xFFFFFFFF



def reference_uniform(key: int, position: int, lane: int) -> float:
    """The same Murmur3 word hash with Python's unbounded ints: checks the tensor code never overflows."""

    def mul(a, c):
        return (a * c) & M32

    def rotl(a, r):
        return ((a << r) & M32) | (a >> (32 - r))

    def absorb(h, w):
        w = mul(rotl(mul(w, 0xCC9E2D51), 15), 0x1B873593)
        return (rotl(h ^ w, 13) * 5 + 0xE6546B64) & M32

    def finish(h):
        h ^= 24
        h = mul(h ^ (h >> 16), 0x85EBCA6B)
        h = mul(h ^ (h >> 13), 0xC2B2AE35)
        return h ^ (h >> 16)

    h = 0
    for w in (key & M32, (key >> 32) & M32, position & M32, (position >> 32) & M32, lane):
        h = absorb(h, w)
    hi, lo = finish(absorb(h, 0)) >> 6, finish(absorb(h, 1)) >> 6
    return ((hi << 26) | lo) / 2.0**52


def grid(n_keys: int, n_pos: int, lane: int = LANE_SAMPLE, seed: int = 0) -> torch.Tensor:
    keys = torch.tensor([request_key(seed, f"prompt-{i}", 0) for i in range(n_keys)])
    positions = torch.arange(n_pos).expand(n_keys, n_pos)
    return uniforms(keys, positions, lane)  # (n_keys, n_pos)


@pytest.fixture(scope="module")
def million() -> torch.Tensor:
    return grid(1000, 1000).flatten()


def test_request_key():
    k = request_key(7, "q-12", 3)
    assert k == request_key(7, "q-12", 3)
    assert 0 <= k < 2**63
    others = {request_key(8, "q-12", 3), request_key(7, "q-13", 3), request_key(7, "q-12", 4), k}
    assert len(others) == 4
    assert request_key(1, 7, 0) != request_key(1, "7", 0)
    with pytest.raises(TypeError, match="sample_index"):
        request_key(1, "a", 1.0)
    with pytest.raises(TypeError, match="prompt_id"):
        request_key(1, 2.5, 0)


def test_matches_unbounded_integer_reference():
    keys = [0, 1, 2**31, 2**32 - 1, 2**32, 2**62 + 12345, 2**63 - 1, request_key(3, "x", 9)]
    positions = [0, 1, 65535, 2**31 - 1, 2**32 + 5, 2**40 + 3, 17, 123456]
    for lane in (LANE_SAMPLE, LANE_DRAFT, LANE_ACCEPT):
        got = uniforms(torch.tensor(keys), torch.tensor(positions), lane)
        want = torch.tensor([reference_uniform(k, p, lane) for k, p in zip(keys, positions)], dtype=torch.float64)
        assert torch.equal(got, want)
    assert ((got >= 0) & (got < 1)).all()


def test_uniform_ks_and_chi_square(million):
    n = million.numel()
    assert million.dtype == torch.float64 and ((million >= 0) & (million < 1)).all()
    s, _ = million.sort()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - s, s - (i - 1) / n).max().item()
    assert ks < 1.95 / math.sqrt(n)  # KS critical value at alpha = 0.001
    # coarse bins (top bits) and fine residues (the low bits of the 52-bit integer)
    for cells in (torch.floor(million * 1000).long(), (million * 2.0**52).long() % 1024):
        counts = torch.bincount(cells).double()
        expected = n / len(counts)
        stat = ((counts - expected) ** 2 / expected).sum()
        dof = torch.tensor((len(counts) - 1) / 2, dtype=torch.float64)
        assert torch.special.gammaincc(dof, stat / 2).item() > 1e-3


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_independent_across_lanes_positions_and_keys():
    n_keys, n_pos = 500, 400
    lanes = [grid(n_keys, n_pos, lane) for lane in (LANE_SAMPLE, LANE_DRAFT, LANE_ACCEPT)]
    bound = 5 / math.sqrt(n_keys * n_pos)
    for i in range(3):
        for j in range(i + 1, 3):
            assert abs(corr(lanes[i], lanes[j])) < bound
    u = lanes[0]
    assert abs(corr(u[:, 1:], u[:, :-1])) < bound  # neighbouring positions
    assert abs(corr(u[1:], u[:-1])) < bound  # neighbouring prompts
    # neighbouring samples of the same prompt (keys differ only in the sample index)
    keys0 = torch.tensor([request_key(0, i, 0) for i in range(n_keys)])
    keys1 = torch.tensor([request_key(0, i, 1) for i in range(n_keys)])
    pos = torch.arange(n_pos).expand(n_keys, n_pos)
    assert abs(corr(uniforms(keys0, pos, 0), uniforms(keys1, pos, 0))) < bound
    # joint uniformity of (sample, accept) at the same position: 10 x 10 cells
    cells = torch.floor(lanes[0] * 10).long() * 10 + torch.floor(lanes[2] * 10).long()
    counts = torch.bincount(cells.flatten(), minlength=100).double()
    expected = cells.numel() / 100
    stat = ((counts - expected) ** 2 / expected).sum()
    assert torch.special.gammaincc(torch.tensor(99 / 2, dtype=torch.float64), stat / 2).item() > 1e-3


def test_deterministic_and_independent_of_batch_composition():
    keys = torch.tensor([request_key(1, i, s) for i in range(6) for s in range(2)])  # (12,)
    positions = torch.arange(12 * 9).reshape(12, 9) % 37 + 100
    u = uniforms(keys, positions, LANE_DRAFT)
    assert torch.equal(u, uniforms(keys.clone(), positions.clone(), LANE_DRAFT))
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(uniforms(keys[perm], positions[perm], LANE_DRAFT), u[perm])  # row order
    assert torch.equal(uniforms(keys[3:4], positions[3:4], LANE_DRAFT), u[3:4])  # alone
    assert torch.equal(uniforms(keys, positions[:, 4], LANE_DRAFT), u[:, 4])  # (B,) positions
    lane = torch.full((12, 9), LANE_DRAFT)
    assert torch.equal(uniforms(keys, positions, lane), u)  # tensor lanes
    mixed = uniforms(keys, positions[:, :3], torch.tensor([LANE_SAMPLE, LANE_DRAFT, LANE_ACCEPT]))
    assert torch.equal(mixed[:, 1], u[:, 1]) and torch.equal(mixed[:, 0], uniforms(keys, positions[:, 0], LANE_SAMPLE))


def test_different_keys_give_different_streams():
    u = grid(2000, 8)
    assert torch.unique(u.flatten()).numel() == u.numel()  # no repeated value among 16k 52-bit draws
    assert not torch.equal(grid(4, 8, seed=0), grid(4, 8, seed=1))


def test_rejects_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="positions"):
        uniforms(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 0)
    with pytest.raises(TypeError, match="integer"):
        uniforms(torch.zeros(3, dtype=torch.long), torch.zeros(3), 0)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    keys = torch.tensor([request_key(0, i, 0) for i in range(64)])
    positions = torch.arange(64 * 32).reshape(64, 32)
    cpu = uniforms(keys, positions, LANE_ACCEPT)
    assert torch.equal(uniforms(keys.cuda(), positions.cuda(), LANE_ACCEPT).cpu(), cpu)
