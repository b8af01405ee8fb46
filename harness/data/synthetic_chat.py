"""A chat data set generated deterministically from a seed: no download, no files.

Tasks are chosen so that assistant replies range from two characters ("no") to several
hundred (counting, repeating), i.e. over two orders of magnitude in target tokens.
"""

from __future__ import annotations

import random
import string


def _parity(rng: random.Random) -> tuple[str, str]:
    n = rng.randrange(1000)
    return f"is {n} even?", "yes" if n % 2 == 0 else "no"


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"add {a} and {b}", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    letters = [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 30))]
    return "reverse: " + " ".join(letters), " ".join(reversed(letters))


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = [rng.choice(string.digits) for _ in range(rng.randint(2, 40))]
    return "sort: " + "".join(digits), "".join(sorted(digits))


def _count(rng: random.Random) -> tuple[str, str]:
    start = rng.randint(1, 20)
    stop = start + rng.randint(5, 110)
    return f"count from {start} to {stop}", " ".join(str(i) for i in range(start, stop + 1))


def _repeat(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 5)))
    times = rng.randint(2, 70)
    return f"repeat {word} {times} times", " ".join([word] * times)


TASKS = {
    "parity": _parity,
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
    "repeat": _repeat,
}
SYSTEM = "You are a precise assistant."


def generate(num_examples: int, seed: int) -> list[dict]:
    """`num_examples` conversations, each `{"example_id", "task", "messages"}`."""
    rng = random.Random(seed)
    names = sorted(TASKS)
    rows = []
    for i in range(num_examples):
        task = names[rng.randrange(len(names))]
        prompt, reply = TASKS[task](rng)
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": reply},
        ]
        rows.append({"example_id": f"syn-{i:06d}", "task": task, "messages": messages})
    return rows
