"""Built-in verifiable task: integer arithmetic with written-out, checkable solutions.

What: a seeded generator of problems such as `Q: 347*29=\\n` whose solution (the text the policy
generates after the prompt) works the problem column by column and ends with the single answer
line `ans 10063`; the model then emits <eos>. The reward only reads that last line (reward.py).

Why this shape. RL on real reasoning tasks sees a long-tailed response length distribution (a few
very long rollouts per batch), which is what speculative rollouts and the tuner must cope with. The
families below mix short additions and subtractions (30-60 tokens) with written-out
multiplications (up to ~190 tokens): with the default weights, responses average ~63 tokens with
p90/p10 ~4.5 (tests/tasks check mean >= 60 and p90/p10 >= 4). Every family is built from three
primitive column traces, so a small char-level model learns a handful of local skills (one-digit
tables, carries, copying the digit of the current column); long problems are long because they
chain many easy lines, not because any single line is hard. A slip anywhere in a long chain spoils
the answer, which is meant to keep a small model's exact-answer accuracy well below 100% and leave
RL room to improve (the difficulty knobs are in `Difficulty` and the family weights).

Solution grammar (every line is true integer arithmetic; digits are taken right to left):

    block    := header "\\n" step+ "=" result "\\n"
    header   := x "+" y  |  x "-" y  |  x "*" d            (d a single digit 1-9)
    step     := dx "+" dy "+" c "=" s       add: carry out c' = s // 10
              | t "-" dy "-" b "=" r        sub: t is dx, or dx+10 when dx-dy-b < 0; b' = (t >= 10)
              | dx "*" d "+" c "=" s        mul by one digit: c' = s // 10
    result   := the last step's full value, then the units digit of each earlier step, last to
                first (sub: leading zeros dropped)
    solution := block+ "ans " answer        (no trailing newline; <eos> follows)

Families (the prompt is `Q: <expression>=\\n`):
    add    x+y                 one add block
    sub    x-y, x >= y         one sub block
    chain  t0+t1-t2(+t3)       left to right, one add/sub block per operator, every running value
                               stays >= 0 (a '-' that would go negative is drawn as '+')
    mul    x*y                 one mul block per digit of y (units first; y has no zero digits),
                               then the shifted partial products are summed with add blocks

Invariants:
  * `problem(i)` is a pure function of (seed, i, families, weights, difficulty, heldout_size,
    stratified): each problem draws from its own `random.Random` seeded by a hash of (stream, seed,
    index); there is no global RNG and no order dependence.
  * Families: drawn independently per problem (the default everywhere), or, with
    `stratified=True` (`data.stratify_families` in `respec train`), fixed by a low-discrepancy
    sequence so that every window of consecutive problems holds the family weights almost exactly.
    Why it exists: family pass rates of the built-in actor run from 2% (chain) to 85% (add), so a
    window's family mix moves the training-reward curve (default run, seed 0: the last 10% of steps
    drew a mix 0.021 harder than the first 10%). Why it is off by default: one 600-step run on the
    stratified stream (seed 0) gained less on the held-out set (+0.037, against +0.053 and +0.067
    for two runs on the independent stream) and its first 10% of steps happened to be easy within
    their families (reward 0.419), so it showed no gain in the reward bar either; one run cannot
    tell a cost from noise, and the independent stream is what every other measurement used.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType

ANSWER_MARKER = "ans "  # the final line of every solution is ANSWER_MARKER + answer
PROMPT_PREFIX = "Q: "


@dataclass(frozen=True)
class Problem:
    id: str  # "arith-s{seed}-{index}" (training stream) or "arith-s{seed}-h{index}" (held out)
    prompt: str  # "Q: 347*29=\n"
    solution: str  # the response to learn: step lines, then "ans 10063" (no <eos>, no final newline)
    answer: str  # "10063": the exact string the reward compares against
    family: str  # "add" | "sub" | "chain" | "mul"


@dataclass(frozen=True)
class Difficulty:
    """Operand sizes per family; ranges are inclusive (lo, hi) digit counts."""

    # Defaults sized so the built-in ~5M actor reaches a ~40% pass rate at temperature 1 in a
    # 10-minute CPU pretraining (RL needs room both ways) while responses keep a long tail
    # (2,000 problems: mean ~63 tokens, p90/p10 ~4.5). 3-digit multipliers (responses to ~320
    # tokens) left the same budget at 18%.
    add_digits: tuple[int, int] = (1, 3)  # first addend
    add_second_digits: tuple[int, int] = (1, 2)
    sub_digits: tuple[int, int] = (2, 3)  # minuend; the subtrahend has 1..as many digits, <= minuend
    chain_terms: tuple[int, int] = (3, 3)  # number of terms
    chain_digits: tuple[int, int] = (1, 2)  # digits of each term
    mul_digits: tuple[int, int] = (2, 4)  # multiplicand
    mul_multiplier_digits: tuple[int, int] = (1, 2)  # multiplier, every digit in 1-9

    def __post_init__(self) -> None:
        for name in ("add_digits", "add_second_digits", "sub_digits", "chain_terms", "chain_digits",
                     "mul_digits", "mul_multiplier_digits"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"Difficulty.{name} must be a range (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")


# --- the three primitive column traces --------------------------------------------------------
# Each returns (lines, value): the block's text lines (header, steps, "=result") and its value.


def _digits(x: int) -> list[int]:
    """Decimal digits of x >= 0, units first."""
    return [int(ch) for ch in reversed(str(x))]


def _collect(step_values: list[int]) -> str:
    """The block result as written: last step in full, then earlier units digits, last to first."""
    return str(step_values[-1]) + "".join(str(v % 10) for v in reversed(step_values[:-1]))


def _add_block(x: int, y: int) -> tuple[list[str], int]:
    dx, dy = _digits(x), _digits(y)
    lines, values, carry = [f"{x}+{y}"], [], 0
    for i in range(max(len(dx), len(dy))):
        a, b = (dx[i] if i < len(dx) else 0), (dy[i] if i < len(dy) else 0)
        s = a + b + carry
        lines.append(f"{a}+{b}+{carry}={s}")
        values.append(s)
        carry = s // 10
    result = _collect(values)
    assert int(result) == x + y, (x, y, result)
    return lines + [f"={result}"], x + y


def _sub_block(x: int, y: int) -> tuple[list[str], int]:
    assert x >= y >= 0, (x, y)
    dx, dy = _digits(x), _digits(y)
    lines, values, borrow = [f"{x}-{y}"], [], 0
    for i in range(len(dx)):
        b = dy[i] if i < len(dy) else 0
        top = dx[i] + 10 if dx[i] - b - borrow < 0 else dx[i]  # borrow ten from the next column
        r = top - b - borrow
        lines.append(f"{top}-{b}-{borrow}={r}")
        values.append(r)
        borrow = 1 if top >= 10 else 0
    result = _collect(values).lstrip("0") or "0"
    assert int(result) == x - y, (x, y, result)
    return lines + [f"={result}"], x - y


def _mul_digit_block(x: int, d: int) -> tuple[list[str], int]:
    assert 1 <= d <= 9, d
    lines, values, carry = [f"{x}*{d}"], [], 0
    for a in _digits(x):
        s = a * d + carry
        lines.append(f"{a}*{d}+{carry}={s}")
        values.append(s)
        carry = s // 10
    result = _collect(values)
    assert int(result) == x * d, (x, d, result)
    return lines + [f"={result}"], x * d


# --- families: rng -> (expression, solution lines, answer) ------------------------------------


def _number(rng: random.Random, digits: tuple[int, int]) -> int:
    n = rng.randint(*digits)
    return rng.randint(10 ** (n - 1), 10**n - 1)


def _family_add(rng: random.Random, d: Difficulty) -> tuple[str, list[str], int]:
    x, y = _number(rng, d.add_digits), _number(rng, d.add_second_digits)
    lines, value = _add_block(x, y)
    return f"{x}+{y}", lines, value


def _family_sub(rng: random.Random, d: Difficulty) -> tuple[str, list[str], int]:
    x = _number(rng, d.sub_digits)
    m = rng.randint(1, len(str(x)))
    y = rng.randint(10 ** (m - 1), min(10**m - 1, x))
    lines, value = _sub_block(x, y)
    return f"{x}-{y}", lines, value


def _family_chain(rng: random.Random, d: Difficulty) -> tuple[str, list[str], int]:
    terms = [_number(rng, d.chain_digits) for _ in range(rng.randint(*d.chain_terms))]
    value, expr, lines = terms[0], str(terms[0]), []
    for t in terms[1:]:
        op = rng.choice("+-")
        if op == "-" and t > value:
            op = "+"
        block, value = _sub_block(value, t) if op == "-" else _add_block(value, t)
        expr += f"{op}{t}"
        lines += block
    return expr, lines, value


def _family_mul(rng: random.Random, d: Difficulty) -> tuple[str, list[str], int]:
    x = _number(rng, d.mul_digits)
    multiplier_digits = [rng.randint(1, 9) for _ in range(rng.randint(*d.mul_multiplier_digits))]
    y = int("".join(map(str, multiplier_digits)))
    lines, total = [], 0
    for shift, digit in enumerate(reversed(multiplier_digits)):  # units digit first
        block, partial = _mul_digit_block(x, digit)
        lines += block
        shifted = partial * 10**shift
        if shift == 0:
            total = shifted
        else:
            block, total = _add_block(total, shifted)
            lines += block
    assert total == x * y
    return f"{x}*{y}", lines, total


FamilyFn = Callable[[random.Random, Difficulty], tuple[str, list[str], int]]
FAMILIES: MappingProxyType[str, FamilyFn] = MappingProxyType({  # read-only registry
    "add": _family_add,
    "sub": _family_sub,
    "chain": _family_chain,
    "mul": _family_mul,
})
DEFAULT_FAMILIES: tuple[str, ...] = ("add", "sub", "chain", "mul")
DEFAULT_WEIGHTS: tuple[float, ...] = (0.35, 0.15, 0.15, 0.35)


_GOLDEN = (5**0.5 - 1) / 2  # the stratified stream's Weyl step (the most evenly spread irrational)


def _seed_for(stream: str, seed: int, index: int) -> int:
    """A stable 64-bit seed for one problem (Python's hash() of str is salted per process)."""
    key = f"respec.arithmetic|{stream}|{seed}|{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


class ArithmeticTask:
    """Deterministic stream of arithmetic problems plus a fixed, disjoint held-out set."""

    def __init__(
        self,
        seed: int = 0,
        families: Sequence[str] = DEFAULT_FAMILIES,
        weights: Sequence[float] | None = None,
        difficulty: Difficulty = Difficulty(),
        heldout_size: int = 1000,
        stratified: bool = False,
    ):
        self.seed = int(seed)
        self.stratified = bool(stratified)
        self._stratum_offset = _seed_for("stratum", self.seed, 0) / 2.0**64  # the Weyl sequence's start
        self.families = tuple(families)
        unknown = [f for f in self.families if f not in FAMILIES]
        if not self.families or unknown:
            raise ValueError(f"unknown arithmetic families {unknown or '(none given)'}; known: {sorted(FAMILIES)}")
        if weights is None:
            weights = (
                DEFAULT_WEIGHTS if self.families == DEFAULT_FAMILIES
                else tuple(DEFAULT_WEIGHTS[DEFAULT_FAMILIES.index(f)] for f in self.families)
            )
        self.weights = tuple(float(w) for w in weights)
        if len(self.weights) != len(self.families):
            raise ValueError(f"{len(self.weights)} weights given for {len(self.families)} families {self.families}")
        if any(not w >= 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"family weights must be >= 0 with a positive sum, got {self.weights}")
        if heldout_size < 1:
            raise ValueError(f"heldout_size must be >= 1, got {heldout_size}")
        self.difficulty = difficulty
        self.heldout_size = heldout_size
        self._heldout = self._build_heldout()
        self._heldout_prompts = frozenset(p.prompt for p in self._heldout)

    def __repr__(self) -> str:
        return (f"ArithmeticTask(seed={self.seed}, families={self.families}, weights={self.weights}, "
                f"difficulty={self.difficulty}, heldout_size={self.heldout_size}"
                + (", stratified=True)" if self.stratified else ")"))

    def _stratum(self, index: int) -> str:
        """The family of training problem `index` in a stratified stream: a Weyl sequence
        u_i = frac(offset + i * (sqrt(5) - 1) / 2) read through the cumulative weights. Any run of n
        consecutive indices holds each family n * weight times up to a few (the golden-ratio
        sequence has discrepancy O(log n)), where independent draws stray by sqrt(n * w * (1 - w))."""
        u = (self._stratum_offset + index * _GOLDEN) % 1.0
        total, acc = sum(self.weights), 0.0
        for family, w in zip(self.families, self.weights):
            acc += w / total
            if u < acc:
                return family
        return [f for f, w in zip(self.families, self.weights) if w > 0][-1]  # u within rounding of 1

    def _draw(self, rng: random.Random, problem_id: str, family: str | None = None) -> Problem:
        if family is None:
            family = rng.choices(self.families, weights=self.weights)[0]
        expr, lines, value = FAMILIES[family](rng, self.difficulty)
        answer = str(value)
        solution = "\n".join(lines) + f"\n{ANSWER_MARKER}{answer}"
        prompt = f"{PROMPT_PREFIX}{expr}=\n"
        return Problem(id=problem_id, prompt=prompt, solution=solution, answer=answer, family=family)

    def _build_heldout(self) -> tuple[Problem, ...]:
        problems: list[Problem] = []
        seen: set[str] = set()
        draw = 0
        while len(problems) < self.heldout_size:
            p = self._draw(random.Random(_seed_for("heldout", self.seed, draw)), f"arith-s{self.seed}-h{len(problems)}")
            draw += 1
            if p.prompt not in seen:
                seen.add(p.prompt)
                problems.append(p)
            if draw > 50 * self.heldout_size:
                raise ValueError(f"cannot draw {self.heldout_size} distinct held-out problems from {self!r}: "
                                 f"the problem space is too small; lower heldout_size or widen the difficulty")
        return tuple(problems)

    def problem(self, index: int) -> Problem:
        """Training problem `index` (any int >= 0); never one of the held-out prompts."""
        if index < 0:
            raise IndexError(f"problem index must be >= 0, got {index}")
        rng = random.Random(_seed_for("train", self.seed, index))
        family = self._stratum(index) if self.stratified else None
        for _ in range(1000):
            p = self._draw(rng, f"arith-s{self.seed}-{index}", family)
            if p.prompt not in self._heldout_prompts:
                return p
        raise RuntimeError(f"problem {index}: every draw clashed with the held-out set of {self!r}")

    def problems(self, start: int, count: int) -> list[Problem]:
        return [self.problem(i) for i in range(start, start + count)]

    def heldout(self, n: int = 500) -> list[Problem]:
        """The first n of the fixed held-out problems (same seed -> same set, whatever was drawn before)."""
        if not 0 <= n <= self.heldout_size:
            raise ValueError(f"heldout n must be in [0, {self.heldout_size}] (heldout_size), got {n}")
        return list(self._heldout[:n])
