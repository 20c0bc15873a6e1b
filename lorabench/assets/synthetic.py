"""Synthetic datasets generated from a seed: exact answers, any size, in no pretraining corpus.

`arith` mixes three kinds of problems in equal shares:
  "What is 23 + 45?"                                              -> "68"
  "What is 67 - 12?"                                              -> "55"   (never negative)
  "Tom has 23 apples, buys 45 and gives away 12. How many apples does Tom have?" -> "56"
The word problems apply a gain and a loss in either order, and never go below zero.
"""
from __future__ import annotations

import random

NAMES = ("Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ravi", "Eva", "Ken", "Zoe")
ITEMS = ("apples", "books", "coins", "marbles", "stamps", "pencils", "cards", "shells")
GAINS = ("buys", "finds", "receives", "wins")
LOSSES = ("gives away", "loses", "sells", "donates")
KINDS = ("add", "sub", "word")


def arith(n: int, seed: int, max_operand: int = 99) -> list[dict]:
    """`n` problems [{"question", "answer"}], the same for the same (n, seed, max_operand);
    a prefix of a larger draw with the same seed. Operands are in 1..max_operand."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"arith: n must be an int >= 0, got {n!r}")
    if not isinstance(max_operand, int) or max_operand < 1:
        raise ValueError(f"arith: max_operand must be an int >= 1, got {max_operand!r}")
    rng = random.Random(seed)
    return [_problem(rng, max_operand) for _ in range(n)]


def _problem(rng: random.Random, top: int) -> dict:
    kind = rng.choice(KINDS)
    a, b = rng.randint(1, top), rng.randint(1, top)
    if kind == "add":
        return {"question": f"What is {a} + {b}?", "answer": str(a + b)}
    if kind == "sub":
        a, b = max(a, b), min(a, b)
        return {"question": f"What is {a} - {b}?", "answer": str(a - b)}
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    gain, loss = rng.choice(GAINS), rng.choice(LOSSES)
    if rng.random() < 0.5:  # gain first: anything up to a + b can go
        c = rng.randint(1, a + b)
        steps = f"{gain} {b} and {loss} {c}"
    else:  # loss first: at most a can go
        c = rng.randint(1, a)
        steps = f"{loss} {c} and {gain} {b}"
    question = f"{name} has {a} {items}, {steps}. How many {items} does {name} have?"
    return {"question": question, "answer": str(a + b - c)}
