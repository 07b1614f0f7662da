"""The "held-out equations" variant of the synthetic task (difficulty level 6).

Why: on the plain levels every equation a held-out item needs ("8 + 5 = 13") also appears in the
train CoTs, so SFT can reach ~95 % by memorising a small equation table and the comparison of
SFT's best epoch against ReFT (reft.md §6, §8) means nothing. Here:

* a fixed fraction of the equations ``before op operand`` (a hash of the data seed and the
  equation) is reserved for held-out items;
* the steps of a story (add/sub only) commute, so every order that keeps the running total in
  [1, max_value] is a valid reasoning path, and the answer reward accepts all of them;
* an item is a **train** item if at least one valid order uses only train equations; its one
  annotated CoT is a random such order (as on GSM8K, one annotated path per question);
* an item is a **held-out** item if *every* valid order needs a reserved equation, so a model
  that only memorised the train CoTs' equations cannot solve any held-out item.

The train items' *other* valid orders often go through reserved equations: sampling them is how
RL with the answer reward can meet (and be rewarded for) arithmetic the annotated paths never show.
"""
from __future__ import annotations

import itertools
import random
import zlib

SYMBOL = {"add": "+", "sub": "-"}


def equation(before: int, op: str, operand: int) -> tuple[int, str, int]:
    return before, SYMBOL[op], operand


def is_held_out(eq: tuple[int, str, int], fraction: float, seed: int) -> bool:
    """Deterministic across processes and Python versions (crc32, not the salted hash())."""
    a, symbol, b = eq
    return zlib.crc32(f"{seed}:{a}{symbol}{b}".encode()) % 10_000 < fraction * 10_000


def replay(start: int, ops: list[tuple[str, int]], max_value: int) -> list[tuple[int, str, int, int]] | None:
    """[(before, op, operand, after)] applying ops in this order, or None if a running total leaves
    [1, max_value] (the story must stay meaningful: at least one object left, bounded counts)."""
    value, out = start, []
    for op, operand in ops:
        after = value + operand if op == "add" else value - operand
        if not 1 <= after <= max_value:
            return None
        out.append((value, op, operand, after))
        value = after
    return out


def valid_orders(start: int, steps, max_value: int) -> list[tuple[int, ...]]:
    """Distinct step orders (as index tuples) that are valid paths; orders that produce the same
    equation sequence (two identical steps swapped) count once."""
    seen, orders = set(), []
    for order in itertools.permutations(range(len(steps))):
        path = replay(start, [(steps[i].op, steps[i].operand) for i in order], max_value)
        if path is not None and tuple(path) not in seen:
            seen.add(tuple(path))
            orders.append(order)
    return orders


def order_equations(start: int, steps, order) -> list[tuple[int, str, int]]:
    path = replay(start, [(steps[i].op, steps[i].operand) for i in order], 10 ** 9)
    return [equation(before, op, operand) for before, op, operand, _ in path]


def annotate_order(rng: random.Random, start: int, steps, level, seed: int):
    """("train" or "test", the steps re-ordered along the annotated path with before/after updated)."""
    from megatron_reft.data.synthetic import Step

    if set(level.ops) - set(SYMBOL):
        raise ValueError("held-out equations need commuting steps: ops must be add/sub only")
    orders = valid_orders(start, steps, level.max_value)  # never empty: the question's own order is valid
    clean = [o for o in orders
             if not any(is_held_out(eq, level.held_out_equations, seed) for eq in order_equations(start, steps, o))]
    split = "train" if clean else "test"
    order = rng.choice(clean or orders)
    path = replay(start, [(steps[i].op, steps[i].operand) for i in order], level.max_value)
    return split, [Step(op, operand, before, after, steps[i].phrase)
                   for i, (before, op, operand, after) in zip(order, path)]


def record_equations(ncot: str) -> list[tuple[int, str, int]]:
    """The equations an N-CoT text writes ("5 + 3 = 8" -> (5, "+", 3))."""
    import re

    return [(int(a), symbol, int(b)) for a, symbol, b in re.findall(r"(\d+) ([-+]) (\d+) = \d+", ncot)]
