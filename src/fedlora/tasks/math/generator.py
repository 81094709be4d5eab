"""Deterministic math word problems in GSM8K's format, with a category per problem.

Protocol
--------
``generate_math(n, seed)`` returns ``n`` examples, each a dict::

    {"question": "Liam has 12 marbles. ...",
     "answer":   "Liam starts with 12 marbles ... 12 + 7 = 19 ...\\n#### 24",   # worked solution
     "final":    "24",                # the number after ``####`` (no commas)
     "category": "addition",          # drives non-IID partitions
     "template": "addition.collect",  # which template wrote it
     "steps":    [[12, "+", 7, 19], [19, "+", 5, 24]]}   # the arithmetic, in order

* Deterministic: example ``i`` is drawn from ``random.Random(f"fedlora-math:{seed}:{i}")``, so
  the output depends only on ``(seed, i)`` (never on the global RNG, the platform or
  ``PYTHONHASHSEED``), and ``generate_math(n, seed)`` is a prefix of ``generate_math(m, seed)``
  for ``n <= m``. ``start`` shifts the index range, which is how a disjoint test set is drawn.
* Categories cycle in the order of :data:`CATEGORIES` (or ``categories``), so every category
  gets ``n / K`` problems (+-1). Within a category the template, wording, names, objects and
  numbers are random.
* The worked solution writes one sentence per arithmetic step (``a op b = r``; numbers of 1,000
  or more with thousands commas, as GSM8K does) and ends with the line ``#### <final>``, where
  the final number has no commas. ``annotate=True`` adds GSM8K's calculator annotations
  (``12 + 7 = <<12+7=19>>19``).
* Difficulty: one to three steps, operands mostly below 50 (money up to a few hundred, a few
  products above 1,000), integer results; a few temperature problems have negative answers.
* Every number in a question is an operand, in the order the template's formula uses it, so a
  test can recompute each answer from the question text alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

CATEGORIES: tuple[str, ...] = (
    "addition",
    "subtraction",
    "multiplication",
    "division",
    "fractions",
    "percentages",
    "multi_step",
    "rates",
)

_NAMES: tuple[tuple[str, str], ...] = (
    ("Liam", "he"), ("Emma", "she"), ("Noah", "he"), ("Olivia", "she"), ("Mateo", "he"), ("Ava", "she"),
    ("Lucas", "he"), ("Mia", "she"), ("Ethan", "he"), ("Sofia", "she"), ("Omar", "he"), ("Amara", "she"),
    ("Kenji", "he"), ("Priya", "she"), ("Diego", "he"), ("Chloe", "she"), ("Tariq", "he"), ("Lena", "she"),
    ("Samuel", "he"), ("Grace", "she"), ("Arjun", "he"), ("Zoe", "she"), ("Felix", "he"), ("Nadia", "she"),
    ("Jonas", "he"), ("Yuki", "she"), ("Kwame", "he"), ("Hannah", "she"), ("Ivan", "he"), ("Layla", "she"),
)  # fmt: skip

_THINGS: tuple[str, ...] = (
    "marbles", "stickers", "pencils", "apples", "cookies", "stamps", "seashells", "crayons", "cards",
    "buttons", "beads", "oranges", "books", "toy cars", "balloons", "shells", "coins", "muffins",
)  # fmt: skip

_ITEMS: tuple[str, ...] = (
    "book", "sandwich", "notebook", "toy robot", "hat", "ball", "puzzle", "scarf", "lunch box", "kite",
    "board game", "water bottle", "backpack", "pair of socks", "plant", "flashlight",
)  # fmt: skip

_CONTAINERS: tuple[tuple[str, str], ...] = (
    ("boxes", "box"), ("bags", "bag"), ("packs", "pack"), ("jars", "jar"), ("baskets", "basket"),
    ("crates", "crate"), ("trays", "tray"),
)  # fmt: skip

_PLACES: tuple[str, ...] = ("the park", "the library", "the market", "school", "the museum", "the beach")

_OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a // b,
}
_SYMBOLS = {"+": "+", "-": "-", "*": "x", "/": "/"}


def fmt(n: int) -> str:
    """``n`` as GSM8K's worked solutions write it: thousands commas (``1,200``), sign kept."""
    return f"{n:,}"


class _Work:
    """The worked solution being written: arithmetic steps (checked) and sentences."""

    def __init__(self, annotate: bool) -> None:
        self.annotate = annotate
        self.steps: list[list[Any]] = []
        self.lines: list[str] = []

    def calc(self, a: int, op: str, b: int) -> tuple[str, int]:
        """``"a op b = r"`` and ``r``; division must be exact."""
        if op == "/" and (b == 0 or a % b):
            raise AssertionError(f"inexact division {a} / {b}")
        r = _OPS[op](a, b)
        self.steps.append([a, op, b, r])
        note = f"<<{a}{op}{b}={r}>>" if self.annotate else ""
        return f"{fmt(a)} {_SYMBOLS[op]} {fmt(b)} = {note}{fmt(r)}", r

    def say(self, line: str) -> None:
        self.lines.append(line)


def _person(rng: random.Random, avoid: str | None = None) -> tuple[str, str, str, str]:
    """(name, he/she, him/her, his/her)."""
    while True:
        name, pron = rng.choice(_NAMES)
        if name != avoid:
            break
    return name, pron, "him" if pron == "he" else "her", "his" if pron == "he" else "her"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# ---- templates: (rng, work) -> question ---------------------------------------------------------
# Each template's docstring gives its formula over the question's numbers, in order of appearance.


def _add_collect(rng: random.Random, w: _Work) -> str:
    """a + b + c"""
    name, he, _, _ = _person(rng)
    obj = rng.choice(_THINGS)
    a, b, c = rng.randint(5, 40), rng.randint(2, 25), rng.randint(2, 20)
    q = rng.choice(
        [
            f"{name} has {a} {obj}. {_cap(he)} buys {b} more and then gets {c} from a friend. "
            f"How many {obj} does {name} have now?",
            f"{name} had {a} {obj}. On Monday {he} found {b} more, and on Tuesday {he} found another {c}. "
            f"How many {obj} does {name} have in total?",
        ]
    )
    e1, r1 = w.calc(a, "+", b)
    e2, r2 = w.calc(r1, "+", c)
    w.say(f"After getting {b} more, {name} has {e1} {obj}.")
    w.say(f"After {c} more, {he} has {e2} {obj}.")
    return q


def _add_shopping(rng: random.Random, w: _Work) -> str:
    """a + b + c"""
    name, he, _, _ = _person(rng)
    i1, i2, i3 = rng.sample(_ITEMS, 3)
    a, b, c = rng.randint(3, 40), rng.randint(2, 30), rng.randint(1, 15)
    q = rng.choice(
        [
            f"{name} buys a {i1} for ${a}, a {i2} for ${b} and a {i3} for ${c}. How much does {he} spend in total?",
            f"At the store, a {i1} costs ${a}, a {i2} costs ${b} and a {i3} costs ${c}. "
            f"{name} buys one of each. How many dollars does {he} pay?",
        ]
    )
    e1, r1 = w.calc(a, "+", b)
    e2, r2 = w.calc(r1, "+", c)
    w.say(f"The {i1} and the {i2} cost {e1} dollars.")
    w.say(f"With the {i3}, {name} pays {e2} dollars.")
    return q


def _add_farm(rng: random.Random, w: _Work) -> str:
    """a + b + c"""
    kinds = rng.sample(["cows", "pigs", "sheep", "goats", "horses", "chickens", "ducks"], 3)
    a, b, c = rng.randint(3, 45), rng.randint(2, 30), rng.randint(2, 30)
    q = f"A farm has {a} {kinds[0]}, {b} {kinds[1]} and {c} {kinds[2]}. How many animals are on the farm?"
    e1, r1 = w.calc(a, "+", b)
    e2, r2 = w.calc(r1, "+", c)
    w.say(f"There are {e1} {kinds[0]} and {kinds[1]}.")
    w.say(f"Adding the {kinds[2]}, there are {e2} animals.")
    return q


def _sub_change(rng: random.Random, w: _Work) -> str:
    """a - b - c"""
    name, he, _, _ = _person(rng)
    i1, i2 = rng.sample(_ITEMS, 2)
    b, c = rng.randint(3, 25), rng.randint(2, 15)
    a = rng.randint(b + c + 1, b + c + 40)
    q = rng.choice(
        [
            f"{name} has ${a}. {_cap(he)} buys a {i1} for ${b} and a {i2} for ${c}. "
            f"How much money does {name} have left?",
            f"{name} goes to the shop with ${a}. {_cap(he)} spends ${b} on a {i1} and ${c} on a {i2}. "
            f"How many dollars does {he} have left?",
        ]
    )
    e1, r1 = w.calc(a, "-", b)
    e2, r2 = w.calc(r1, "-", c)
    w.say(f"After the {i1}, {name} has {e1} dollars.")
    w.say(f"After the {i2}, {he} has {e2} dollars left.")
    return q


def _sub_bus(rng: random.Random, w: _Work) -> str:
    """a - b - c"""
    b, c = rng.randint(2, 15), rng.randint(2, 15)
    a = rng.randint(b + c, b + c + 30)
    q = rng.choice(
        [
            f"A bus has {a} passengers. At the first stop {b} people get off, and at the second stop {c} "
            f"people get off. How many passengers are still on the bus?",
            f"A train car holds {a} people. {b} people leave at one station and {c} leave at the next. "
            f"How many people are left in the car?",
        ]
    )
    e1, r1 = w.calc(a, "-", b)
    e2, r2 = w.calc(r1, "-", c)
    w.say(f"After the first stop there are {e1} people.")
    w.say(f"After the second stop there are {e2} people.")
    return q


def _sub_temperature(rng: random.Random, w: _Work) -> str:
    """a + b - c (may be negative)"""
    a, b, c = rng.randint(0, 20), rng.randint(2, 12), rng.randint(5, 40)
    q = (
        f"The temperature was {a} degrees in the morning. It rose by {b} degrees by noon and then "
        f"dropped by {c} degrees by midnight. What was the temperature at midnight, in degrees?"
    )
    e1, r1 = w.calc(a, "+", b)
    e2, r2 = w.calc(r1, "-", c)
    w.say(f"At noon it was {e1} degrees.")
    w.say(f"At midnight it was {e2} degrees.")
    return q


def _sub_pages(rng: random.Random, w: _Work) -> str:
    """a - (b + c)"""
    name, he, _, his = _person(rng)
    b, c = rng.randint(3, 25), rng.randint(3, 25)
    a = rng.randint(b + c + 2, b + c + 45)
    q = (
        f"{name}'s book has {a} pages. {_cap(he)} reads {b} pages on Saturday and {c} pages on Sunday. "
        f"How many pages are left to read?"
    )
    e1, r1 = w.calc(b, "+", c)
    e2, r2 = w.calc(a, "-", r1)
    w.say(f"Over the weekend {name} reads {e1} pages.")
    w.say(f"So {e2} pages of {his} book are left.")
    return q


def _mul_boxes(rng: random.Random, w: _Work) -> str:
    """a * b + c"""
    name, he, _, _ = _person(rng)
    cont, one = rng.choice(_CONTAINERS)
    obj = rng.choice(_THINGS)
    a, b, c = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 20)
    q = rng.choice(
        [
            f"{name} has {a} {cont} with {b} {obj} in each {one}, plus {c} loose {obj}. How many {obj} does {he} have?",
            f"There are {a} {cont} of {obj}. Each {one} holds {b} {obj}. {name} adds {c} more {obj}. "
            f"How many {obj} are there now?",
        ]
    )
    e1, r1 = w.calc(a, "*", b)
    e2, r2 = w.calc(r1, "+", c)
    w.say(f"The {cont} hold {e1} {obj}.")
    w.say(f"With the other {c}, there are {e2} {obj}.")
    return q


def _mul_rows(rng: random.Random, w: _Work) -> str:
    """a * b - c"""
    a, b = rng.randint(3, 12), rng.randint(3, 12)
    c = rng.randint(1, min(20, a * b - 1))
    place = rng.choice(["a theater", "a classroom", "a hall", "a stadium section"])
    q = f"{_cap(place)} has {a} rows of {b} seats. {c} seats are taken. How many seats are empty?"
    e1, r1 = w.calc(a, "*", b)
    e2, r2 = w.calc(r1, "-", c)
    w.say(f"There are {e1} seats.")
    w.say(f"Empty seats: {e2}.")
    return q


def _mul_sales(rng: random.Random, w: _Work) -> str:
    """a * b (often 1,000 or more)"""
    item = rng.choice(["bikes", "tablets", "chairs", "lamps", "tickets", "jackets"])
    a, b = rng.randint(6, 30), rng.choice([20, 25, 40, 50, 60, 75, 80, 100, 120, 150, 200])
    q = f"A shop sells {a} {item} for ${b} each. How much money does the shop make, in dollars?"
    e1, _ = w.calc(a, "*", b)
    w.say(f"The shop makes {e1} dollars.")
    return q


def _div_share(rng: random.Random, w: _Work) -> str:
    """a / b"""
    name, he, _, his = _person(rng)
    obj = rng.choice(_THINGS)
    b, each = rng.randint(2, 9), rng.randint(2, 12)
    a = b * each
    if rng.random() < 0.5:
        q = f"{name} has {a} {obj} and shares them equally among {b} friends. How many {obj} does each friend get?"
        e1, _ = w.calc(a, "/", b)
        w.say(f"Each friend gets {e1} {obj}.")
    else:
        q = f"{name} puts {a} {obj} into {b} equal piles. How many {obj} are in each pile?"
        e1, _ = w.calc(a, "/", b)
        w.say(f"Each pile has {e1} {obj}.")
    return q


def _div_bake(rng: random.Random, w: _Work) -> str:
    """(a + b) / c"""
    name, he, _, _ = _person(rng)
    c, bags = rng.randint(2, 8), rng.randint(2, 9)
    total = c * bags
    a = rng.randint(1, total - 1)
    b = total - a
    q = (
        f"{name} bakes {a} muffins in the morning and {b} muffins in the afternoon. {_cap(he)} packs them "
        f"in bags of {c}. How many bags does {he} fill?"
    )
    e1, r1 = w.calc(a, "+", b)
    e2, _ = w.calc(r1, "/", c)
    w.say(f"{name} bakes {e1} muffins.")
    w.say(f"That fills {e2} bags.")
    return q


def _div_teams(rng: random.Random, w: _Work) -> str:
    """(a - b) / c"""
    c, teams = rng.randint(2, 6), rng.randint(2, 8)
    b = rng.randint(1, 9)
    a = c * teams + b
    q = (
        f"There are {a} students in a gym class. {b} of them are sick and sit out. The rest form teams of {c}. "
        f"How many teams are there?"
    )
    e1, r1 = w.calc(a, "-", b)
    e2, _ = w.calc(r1, "/", c)
    w.say(f"{e1} students play.")
    w.say(f"They form {e2} teams.")
    return q


def _frac_give(rng: random.Random, w: _Work) -> str:
    """a - a * 1 / k"""
    name, he, _, _ = _person(rng)
    other, _, _, _ = _person(rng, avoid=name)
    obj = rng.choice(_THINGS)
    k = rng.choice([2, 3, 4, 5])
    a = k * rng.randint(2, 10)
    q = f"{name} has {a} {obj}. {_cap(he)} gives 1/{k} of them to {other}. How many {obj} does {name} have left?"
    e1, r1 = w.calc(a, "/", k)
    e2, _ = w.calc(a, "-", r1)
    w.say(f"{name} gives away {e1} {obj}.")
    w.say(f"{_cap(he)} has {e2} {obj} left.")
    return q


def _frac_pizza(rng: random.Random, w: _Work) -> str:
    """a / k * m   (the question reads "m/k of the a ...")"""
    k = rng.choice([3, 4, 5, 6])
    m = rng.randint(2, k - 1)
    a = k * rng.randint(2, 8)
    name, _, _, _ = _person(rng)
    food = rng.choice(["slices of pizza", "grapes", "cherries", "crackers"])
    q = f"{name} eats {m}/{k} of the {a} {food} on a plate. How many {food} does {name} eat?"
    e1, r1 = w.calc(a, "/", k)
    e2, _ = w.calc(r1, "*", m)
    w.say(f"One part of {k} is {e1} {food}.")
    w.say(f"{m} parts are {e2} {food}.")
    return q


def _frac_class(rng: random.Random, w: _Work) -> str:
    """a - a * 1 / k"""
    k = rng.choice([2, 3, 4, 5, 6])
    a = k * rng.randint(3, 8)
    group = rng.choice(["wear glasses", "play chess", "have a pet", "ride a bike to school"])
    q = f"A class has {a} students. 1/{k} of them {group}. How many students do not?"
    e1, r1 = w.calc(a, "/", k)
    e2, _ = w.calc(a, "-", r1)
    w.say(f"{e1} students {group}.")
    w.say(f"So {e2} students do not.")
    return q


_PERCENT_FRACTIONS = {10: (1, 10), 20: (1, 5), 25: (1, 4), 50: (1, 2), 40: (2, 5), 75: (3, 4)}


def _percent_of(w: _Work, a: int, p: int) -> tuple[str, int]:
    """Sentences computing ``p% of a`` as a fraction (``25% = 1/4``): one or two steps."""
    num, den = _PERCENT_FRACTIONS[p]
    e1, r = w.calc(a, "/", den)
    text = f"{p}% is {num}/{den}, and {e1}"
    if num > 1:
        e2, r = w.calc(r, "*", num)
        text += f", and {e2}"
    return text, r


def _pct_part(rng: random.Random, w: _Work) -> str:
    """a * p / 100"""
    p = rng.choice(sorted(_PERCENT_FRACTIONS))
    den = _PERCENT_FRACTIONS[p][1]
    a = den * rng.randint(2, max(3, 60 // den))
    noun, verb = rng.choice(
        [("students", "walk to school"), ("people at the fair", "buy a drink"), ("trees", "are apple trees")]
    )
    q = f"There are {a} {noun}. {p}% of them {verb}. How many of them {verb}?"
    text, r = _percent_of(w, a, p)
    w.say(f"{text}.")
    w.say(f"So {fmt(r)} of them {verb}.")
    return q


def _pct_sale(rng: random.Random, w: _Work) -> str:
    """a - a * p / 100"""
    item = rng.choice(_ITEMS)
    p = rng.choice([10, 20, 25, 50, 40])
    den = _PERCENT_FRACTIONS[p][1]
    a = den * rng.randint(2, max(3, 60 // den))
    q = f"A {item} costs ${a}. It is on sale for {p}% off. What is the sale price, in dollars?"
    text, r = _percent_of(w, a, p)
    e3, _ = w.calc(a, "-", r)
    w.say(f"{text}, so the discount is {fmt(r)} dollars.")
    w.say(f"The sale price is {e3} dollars.")
    return q


def _ms_juice(rng: random.Random, w: _Work) -> str:
    """a * b - c - d"""
    name, he, _, _ = _person(rng)
    a, b = rng.randint(2, 6), rng.choice([4, 6, 8, 10, 12])
    c = rng.randint(1, 6)
    d = rng.randint(1, max(1, a * b - c - 1))
    d = min(d, 15)
    q = (
        f"{name} buys {a} packs of juice boxes with {b} in each pack. {_cap(he)} drinks {c} of them and gives "
        f"{d} to friends. How many juice boxes are left?"
    )
    e1, r1 = w.calc(a, "*", b)
    e2, r2 = w.calc(r1, "-", c)
    e3, _ = w.calc(r2, "-", d)
    w.say(f"{name} buys {e1} juice boxes.")
    w.say(f"After drinking some, {e2} are left.")
    w.say(f"After giving some away, {e3} are left.")
    return q


def _ms_wage(rng: random.Random, w: _Work) -> str:
    """a * b - c"""
    name, he, _, _ = _person(rng)
    a, b = rng.randint(5, 20), rng.randint(2, 8)
    c = rng.randint(3, a * b - 1)
    c = min(c, 60)
    item = rng.choice(_ITEMS)
    q = rng.choice(
        [
            f"{name} earns ${a} per hour and works {b} hours. Then {he} spends ${c} on a {item}. "
            f"How much money does {he} have left?",
            f"{name} makes ${a} an hour babysitting. {_cap(he)} babysits for {b} hours and buys a {item} for ${c}. "
            f"How many dollars does {he} have left?",
        ]
    )
    e1, r1 = w.calc(a, "*", b)
    e2, _ = w.calc(r1, "-", c)
    w.say(f"{name} earns {e1} dollars.")
    w.say(f"After buying the {item}, {he} has {e2} dollars left.")
    return q


def _ms_times_as_many(rng: random.Random, w: _Work) -> str:
    """a + a * b"""
    name, _, _, _ = _person(rng)
    other, _, _, _ = _person(rng, avoid=name)
    obj = rng.choice(_THINGS)
    a, b = rng.randint(2, 15), rng.randint(2, 5)
    q = f"{name} has {a} {obj}. {other} has {b} times as many {obj} as {name}. How many {obj} do they have together?"
    e1, r1 = w.calc(a, "*", b)
    e2, _ = w.calc(a, "+", r1)
    w.say(f"{other} has {e1} {obj}.")
    w.say(f"Together they have {e2} {obj}.")
    return q


def _ms_tickets(rng: random.Random, w: _Work) -> str:
    """a * b + c * d"""
    name, he, _, _ = _person(rng)
    a, b = rng.randint(2, 4), rng.randint(5, 15)
    c, d = rng.randint(2, 4), rng.randint(2, 9)
    place = rng.choice(_PLACES)
    q = (
        f"At {place}, {name} buys {a} adult tickets at ${b} each and {c} child tickets at ${d} each. "
        f"How much does {he} pay in total?"
    )
    e1, r1 = w.calc(a, "*", b)
    e2, r2 = w.calc(c, "*", d)
    e3, _ = w.calc(r1, "+", r2)
    w.say(f"Adult tickets cost {e1} dollars.")
    w.say(f"Child tickets cost {e2} dollars.")
    w.say(f"In total {name} pays {e3} dollars.")
    return q


def _rate_drive(rng: random.Random, w: _Work) -> str:
    """a * b + c"""
    a, b, c = rng.choice([20, 30, 40, 45, 50, 60]), rng.randint(2, 5), rng.randint(3, 30)
    name, he, _, _ = _person(rng)
    q = (
        f"{name} drives at {a} miles per hour for {b} hours, then walks {c} more miles. "
        f"How many miles does {he} travel in total?"
    )
    e1, r1 = w.calc(a, "*", b)
    e2, _ = w.calc(r1, "+", c)
    w.say(f"Driving covers {e1} miles.")
    w.say(f"In total {he} travels {e2} miles.")
    return q


def _rate_reading(rng: random.Random, w: _Work) -> str:
    """a / b   (question: "reads b pages a day ... a-page book", b first)"""
    name, he, _, _ = _person(rng)
    b, days = rng.randint(3, 15), rng.randint(2, 12)
    a = b * days
    q = f"{name} reads {b} pages a day. How many days does it take {name} to read a {a}-page book?"
    # numbers in the question: b, a; the answer is a / b
    e1, _ = w.calc(a, "/", b)
    w.say(f"It takes {e1} days.")
    return q


def _rate_printer(rng: random.Random, w: _Work) -> str:
    """a * (b + c)"""
    a, b, c = rng.randint(2, 12), rng.randint(2, 10), rng.randint(2, 10)
    q = (
        f"A printer prints {a} pages per minute. It runs for {b} minutes, stops, and then runs for {c} more "
        f"minutes. How many pages does it print?"
    )
    e1, r1 = w.calc(b, "+", c)
    e2, _ = w.calc(a, "*", r1)
    w.say(f"It runs for {e1} minutes.")
    w.say(f"It prints {e2} pages.")
    return q


def _rate_weeks(rng: random.Random, w: _Work) -> str:
    """a * 7 * b   (a week has 7 days)"""
    name, he, _, _ = _person(rng)
    a, b = rng.choice([10, 15, 20, 25, 30, 40]), rng.randint(1, 4)
    act = rng.choice(["practices the piano", "jogs", "reads", "studies Spanish"])
    q = f"{name} {act} for {a} minutes every day. How many minutes does {he} spend in {b} weeks?"
    e1, r1 = w.calc(b, "*", 7)
    e2, _ = w.calc(a, "*", r1)
    w.say(f"{b} weeks have {e1} days.")
    w.say(f"{_cap(he)} spends {e2} minutes.")
    return q


Template = Callable[[random.Random, _Work], str]

TEMPLATES: dict[str, dict[str, Template]] = {
    "addition": {"collect": _add_collect, "shopping": _add_shopping, "farm": _add_farm},
    "subtraction": {"change": _sub_change, "bus": _sub_bus, "temperature": _sub_temperature, "pages": _sub_pages},
    "multiplication": {"boxes": _mul_boxes, "rows": _mul_rows, "sales": _mul_sales},
    "division": {"share": _div_share, "bake": _div_bake, "teams": _div_teams},
    "fractions": {"give": _frac_give, "eat": _frac_pizza, "class": _frac_class},
    "percentages": {"part": _pct_part, "sale": _pct_sale},
    "multi_step": {"juice": _ms_juice, "wage": _ms_wage, "times_as_many": _ms_times_as_many, "tickets": _ms_tickets},
    "rates": {"drive": _rate_drive, "reading": _rate_reading, "printer": _rate_printer, "weeks": _rate_weeks},
}


def generate_one(seed: int, index: int, category: str, *, annotate: bool = False) -> dict[str, Any]:
    """Example ``index`` of the stream ``seed`` in ``category`` (see the module docstring)."""
    if category not in TEMPLATES:
        raise ValueError(f"unknown math category {category!r}; available: {', '.join(CATEGORIES)}")
    rng = random.Random(f"fedlora-math:{seed}:{index}")
    name = rng.choice(sorted(TEMPLATES[category]))
    w = _Work(annotate)
    question = TEMPLATES[category][name](rng, w)
    final = w.steps[-1][3]
    answer = "\n".join([*w.lines, f"#### {final}"])
    return {
        "question": question,
        "answer": answer,
        "final": str(final),
        "category": category,
        "template": f"{category}.{name}",
        "steps": w.steps,
    }


def generate_math(
    n: int,
    seed: int,
    categories: Sequence[str] | None = None,
    *,
    start: int = 0,
    annotate: bool = False,
) -> list[dict[str, Any]]:
    """``n`` problems with indices ``start .. start + n - 1`` of the stream ``seed``.

    ``categories`` (default: all of :data:`CATEGORIES`) are cycled in order, so each gets an
    equal share. The same ``(seed, start + i, categories)`` always gives the same problem.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    cats = list(CATEGORIES if categories is None else categories)
    if not cats:
        raise ValueError("categories must not be empty")
    unknown = [c for c in cats if c not in TEMPLATES]
    if unknown:
        raise ValueError(f"unknown math categories {unknown}; available: {', '.join(CATEGORIES)}")
    return [generate_one(seed, i, cats[i % len(cats)], annotate=annotate) for i in range(start, start + n)]


__all__ = ["CATEGORIES", "TEMPLATES", "fmt", "generate_math", "generate_one"]
