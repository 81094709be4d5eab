"""A deterministic generator of small Python instruction/code pairs (CodeAlpaca-style rows).

:func:`generate_code` returns rows ``{"instruction", "input", "output", "category", "tests"}``:
the instruction asks for one function, the output is that function (type hints, a docstring with
one doctest example, a plain body), ``category`` is the template family (the non-IID partition
key) and ``tests`` are ``assert`` lines whose expected values come from an independent
reference implementation (so every row's code is checked against them in the tests).

Example ``i`` of stream ``seed`` belongs to family ``families[i % len(families)]`` (balanced
categories; a longer run keeps a shorter one as its prefix) and draws its variant, function
and parameter names, constants, phrasing and test inputs from ``random.Random(f"code:{seed}:{i}")``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spec:
    """One function to write: its name, signature, description, body and reference."""

    name: str
    params: tuple[str, ...]
    signature: str  # "(numbers: list[int]) -> int"
    desc: str  # "return the sum of the numbers in `numbers`" (lower-case start, no final period)
    body: str  # indented body lines
    ref: Callable[..., Any]
    cases: tuple[tuple[Any, ...], ...]


Maker = Callable[[random.Random], Spec]


def _ints(rng: random.Random, lo: int = -9, hi: int = 20, n: tuple[int, int] = (0, 7)) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(*n))]


def _words(rng: random.Random, n: tuple[int, int] = (1, 5)) -> list[str]:
    pool = ["apple", "sky", "banana", "code", "Python", "river", "a", "level", "moon", "tree", "data", "hello", "it"]
    return [rng.choice(pool) for _ in range(rng.randint(*n))]


def _sentence(rng: random.Random) -> str:
    return " ".join(_words(rng, (1, 6)))


def _pick(rng: random.Random, *choices: str) -> str:
    return rng.choice(choices)


def _list_param(rng: random.Random) -> str:
    return _pick(rng, "numbers", "nums", "values", "xs", "items")


def _str_param(rng: random.Random) -> str:
    return _pick(rng, "s", "text", "string", "word")


# ---- families --------------------------------------------------------------------------------------
def _sum(rng: random.Random) -> Spec:
    p = _list_param(rng)
    v = rng.randrange(4)
    cases = (*tuple((_ints(rng),) for _ in range(3)), ([],))
    if v == 0:
        name = _pick(rng, "sum_list", "list_sum", "add_all", "total_of")
        body = f"    total = 0\n    for x in {p}:\n        total += x\n    return total\n"
        return Spec(name, (p,), f"({p}: list[int]) -> int", f"return the sum of the numbers in `{p}`", body, sum, cases)
    if v == 1:
        name = _pick(rng, "sum_evens", "sum_of_evens", "even_sum")
        body = f"    return sum(x for x in {p} if x % 2 == 0)\n"
        desc = f"return the sum of the even numbers in `{p}`"
        return Spec(
            name, (p,), f"({p}: list[int]) -> int", desc, body, lambda xs: sum(x for x in xs if x % 2 == 0), cases
        )
    if v == 2:
        name = _pick(rng, "sum_squares", "sum_of_squares", "square_sum")
        body = f"    total = 0\n    for x in {p}:\n        total += x * x\n    return total\n"
        desc = f"return the sum of the squares of the numbers in `{p}`"
        return Spec(name, (p,), f"({p}: list[int]) -> int", desc, body, lambda xs: sum(x * x for x in xs), cases)
    k = rng.randint(2, 7)
    name = _pick(rng, f"sum_multiples_of_{k}", f"sum_divisible_by_{k}")
    body = f"    return sum(x for x in {p} if x % {k} == 0)\n"
    desc = f"return the sum of the numbers in `{p}` that are divisible by {k}"
    return Spec(name, (p,), f"({p}: list[int]) -> int", desc, body, lambda xs: sum(x for x in xs if x % k == 0), cases)


def _extremes(rng: random.Random) -> Spec:
    p = _list_param(rng)
    v = rng.randrange(4)
    cases = tuple((_ints(rng, n=(1, 7)),) for _ in range(4))
    if v == 0:
        name = _pick(rng, "max_of_list", "largest", "find_max", "list_max")
        body = (
            f"    best = {p}[0]\n    for x in {p}[1:]:\n        if x > best:\n            best = x\n    return best\n"
        )
        desc = f"return the largest number in the non-empty list `{p}` without using max()"
        return Spec(name, (p,), f"({p}: list[int]) -> int", desc, body, max, cases)
    if v == 1:
        name = _pick(rng, "min_of_list", "smallest", "find_min", "list_min")
        body = (
            f"    best = {p}[0]\n    for x in {p}[1:]:\n        if x < best:\n            best = x\n    return best\n"
        )
        desc = f"return the smallest number in the non-empty list `{p}` without using min()"
        return Spec(name, (p,), f"({p}: list[int]) -> int", desc, body, min, cases)
    if v == 2:
        name = _pick(rng, "index_of_max", "argmax", "max_position")
        body = (
            f"    best = 0\n    for i in range(1, len({p})):\n        if {p}[i] > {p}[best]:\n"
            f"            best = i\n    return best\n"
        )
        desc = f"return the index of the first occurrence of the largest number in the non-empty list `{p}`"
        return Spec(name, (p,), f"({p}: list[int]) -> int", desc, body, lambda xs: xs.index(max(xs)), cases)
    name = _pick(rng, "value_range", "spread", "max_minus_min")
    body = f"    return max({p}) - min({p})\n"
    desc = f"return the difference between the largest and the smallest number in the non-empty list `{p}`"
    return Spec(name, (p,), f"({p}: list[int]) -> int", desc, body, lambda xs: max(xs) - min(xs), cases)


def _reverse(rng: random.Random) -> Spec:
    v = rng.randrange(3)
    if v == 0:
        p = _str_param(rng)
        name = _pick(rng, "reverse_string", "reversed_text", "reverse_str", "backwards")
        cases = tuple((w,) for w in (*_words(rng, (3, 3)), ""))
        return Spec(
            name,
            (p,),
            f"({p}: str) -> str",
            f"return the string `{p}` reversed",
            f"    return {p}[::-1]\n",
            lambda s: s[::-1],
            cases,
        )
    if v == 1:
        p = _pick(rng, "sentence", "text", "s")
        name = _pick(rng, "reverse_words", "words_backwards", "flip_word_order")
        cases = (*tuple((_sentence(rng),) for _ in range(3)), ("one",))
        desc = f"return the words of `{p}` (separated by single spaces) in reverse order, joined by single spaces"
        body = f'    return " ".join(reversed({p}.split()))\n'
        return Spec(name, (p,), f"({p}: str) -> str", desc, body, lambda s: " ".join(reversed(s.split())), cases)
    p = _list_param(rng)
    name = _pick(rng, "reverse_list", "reversed_copy", "list_reverse")
    cases = tuple((_ints(rng),) for _ in range(3))
    body = (
        f"    result = []\n    for i in range(len({p}) - 1, -1, -1):\n        result.append({p}[i])\n"
        f"    return result\n"
    )
    desc = f"return a new list with the elements of `{p}` in reverse order, without using reversed() or slicing"
    return Spec(name, (p,), f"({p}: list[int]) -> list[int]", desc, body, lambda xs: xs[::-1], cases)


def _count_chars(rng: random.Random) -> Spec:
    p = _str_param(rng)
    v = rng.randrange(4)
    cases = (*tuple((_sentence(rng),) for _ in range(3)), ("",))
    if v == 0:
        name = _pick(rng, "count_vowels", "vowel_count", "num_vowels")
        body = f'    return sum(1 for ch in {p}.lower() if ch in "aeiou")\n'
        desc = f"return the number of vowels (a, e, i, o, u, either case) in `{p}`"
        return Spec(name, (p,), f"({p}: str) -> int", desc, body, lambda s: sum(c in "aeiou" for c in s.lower()), cases)
    if v == 1:
        name = _pick(rng, "count_consonants", "consonant_count")
        body = f'    return sum(1 for ch in {p}.lower() if ch.isalpha() and ch not in "aeiou")\n'
        desc = f"return the number of consonants (letters other than a, e, i, o, u, either case) in `{p}`"
        return Spec(
            name,
            (p,),
            f"({p}: str) -> int",
            desc,
            body,
            lambda s: sum(c.isalpha() and c not in "aeiou" for c in s.lower()),
            cases,
        )
    if v == 2:
        c = rng.choice("aeotn")
        name = _pick(rng, f"count_{c}", f"occurrences_of_{c}")
        body = f'    return {p}.count("{c}")\n'
        desc = f"return how many times the letter '{c}' occurs in `{p}`"
        return Spec(name, (p,), f"({p}: str) -> int", desc, body, lambda s: s.count(c), cases)
    name = _pick(rng, "count_upper", "uppercase_count", "num_capitals")
    body = f"    count = 0\n    for ch in {p}:\n        if ch.isupper():\n            count += 1\n    return count\n"
    desc = f"return the number of uppercase letters in `{p}`"
    return Spec(name, (p,), f"({p}: str) -> int", desc, body, lambda s: sum(c.isupper() for c in s), cases)


def _fizzbuzz(rng: random.Random) -> Spec:
    a, b = rng.choice([(3, 5), (2, 7), (3, 4), (2, 5), (4, 6)])
    wa, wb = rng.choice([("Fizz", "Buzz"), ("Foo", "Bar"), ("Ping", "Pong"), ("Tic", "Tac")])
    p = _pick(rng, "n", "limit", "count")
    name = _pick(rng, "fizzbuzz", "fizz_buzz_list", f"{wa.lower()}_{wb.lower()}")
    body = (
        f'    result = []\n    for i in range(1, {p} + 1):\n        word = ""\n'
        f'        if i % {a} == 0:\n            word += "{wa}"\n        if i % {b} == 0:\n            word += "{wb}"\n'
        f"        result.append(word or str(i))\n    return result\n"
    )
    desc = (
        f"return a list of the numbers from 1 to `{p}` as strings, where multiples of {a} are replaced by "
        f'"{wa}", multiples of {b} by "{wb}", and multiples of both by "{wa}{wb}"'
    )

    def ref(n: int) -> list[str]:
        return [("" if i % a else wa) + ("" if i % b else wb) or str(i) for i in range(1, n + 1)]

    cases = ((rng.randint(1, 6),), (a * b,), (0,))
    return Spec(name, (p,), f"({p}: int) -> list[str]", desc, body, ref, cases)


def _palindrome(rng: random.Random) -> Spec:
    v = rng.randrange(3)
    if v == 0:
        p = _str_param(rng)
        name = _pick(rng, "is_palindrome", "palindrome", "reads_same_backwards")
        cases = (("level",), ("abca",), ("",), (rng.choice(["noon", "moon", "racecar", "Anna"]),))
        desc = f"return True if the string `{p}` reads the same forwards and backwards (case-sensitive)"
        return Spec(
            name, (p,), f"({p}: str) -> bool", desc, f"    return {p} == {p}[::-1]\n", lambda s: s == s[::-1], cases
        )
    if v == 1:
        p = _pick(rng, "text", "phrase", "s")
        name = _pick(rng, "is_clean_palindrome", "palindrome_ignoring_case", "is_sentence_palindrome")
        body = f"    cleaned = [ch.lower() for ch in {p} if ch.isalnum()]\n    return cleaned == cleaned[::-1]\n"
        desc = f"return True if `{p}` is a palindrome when case and non-alphanumeric characters are ignored"
        cases = (("A man, a plan, a canal: Panama",), ("Hello",), ("No lemon, no melon",), ("",))

        def ref(s: str) -> bool:
            c = [ch.lower() for ch in s if ch.isalnum()]
            return c == c[::-1]

        return Spec(name, (p,), f"({p}: str) -> bool", desc, body, ref, cases)
    p = _pick(rng, "n", "number", "x")
    name = _pick(rng, "is_palindrome_number", "number_is_palindrome", "palindromic")
    body = f"    if {p} < 0:\n        return False\n    digits = str({p})\n    return digits == digits[::-1]\n"
    desc = f"return True if the integer `{p}` reads the same forwards and backwards (negative numbers are not)"
    cases = ((121,), (-121,), (rng.randint(10, 999),), (0,))
    return Spec(name, (p,), f"({p}: int) -> bool", desc, body, lambda n: n >= 0 and str(n) == str(n)[::-1], cases)


def _factorial(rng: random.Random) -> Spec:
    import math

    p = _pick(rng, "n", "k", "num")
    v = rng.randrange(3)
    cases = ((0,), (1,), (rng.randint(2, 6),), (rng.randint(7, 12),))
    if v == 0:
        name = _pick(rng, "factorial", "fact", "factorial_iterative")
        body = f"    result = 1\n    for i in range(2, {p} + 1):\n        result *= i\n    return result\n"
        desc = f"return the factorial of the non-negative integer `{p}` using a loop"
        return Spec(name, (p,), f"({p}: int) -> int", desc, body, math.factorial, cases)
    if v == 1:
        name = _pick(rng, "factorial_recursive", "rec_factorial", "fact_rec")
        body = f"    if {p} <= 1:\n        return 1\n    return {p} * {name}({p} - 1)\n"
        desc = f"return the factorial of the non-negative integer `{p}` using recursion"
        return Spec(name, (p,), f"({p}: int) -> int", desc, body, math.factorial, cases)
    name = _pick(rng, "double_factorial", "semi_factorial")
    body = f"    result = 1\n    while {p} > 1:\n        result *= {p}\n        {p} -= 2\n    return result\n"
    desc = f"return the double factorial of `{p}` (the product of every second number from `{p}` down to 1 or 2)"

    def ref(n: int) -> int:
        out = 1
        while n > 1:
            out, n = out * n, n - 2
        return out

    return Spec(name, (p,), f"({p}: int) -> int", desc, body, ref, cases)


def _fibonacci(rng: random.Random) -> Spec:
    p = _pick(rng, "n", "k", "count")

    def fibs(n: int) -> list[int]:
        out, a, b = [], 0, 1
        for _ in range(n):
            out.append(a)
            a, b = b, a + b
        return out

    if rng.randrange(2) == 0:
        name = _pick(rng, "fibonacci", "nth_fibonacci", "fib_number")
        body = f"    a, b = 0, 1\n    for _ in range({p}):\n        a, b = b, a + b\n    return a\n"
        desc = f"return the `{p}`-th Fibonacci number, where the sequence starts 0, 1, 1, 2 (index 0 is 0)"
        cases = ((0,), (1,), (rng.randint(2, 10),), (rng.randint(11, 25),))
        return Spec(name, (p,), f"({p}: int) -> int", desc, body, lambda n: fibs(n + 1)[n], cases)
    name = _pick(rng, "fibonacci_list", "first_fibonacci", "fib_sequence")
    body = (
        f"    result = []\n    a, b = 0, 1\n    for _ in range({p}):\n        result.append(a)\n"
        f"        a, b = b, a + b\n    return result\n"
    )
    desc = f"return a list of the first `{p}` Fibonacci numbers, starting 0, 1, 1, 2"
    cases = ((0,), (1,), (rng.randint(2, 12),))
    return Spec(name, (p,), f"({p}: int) -> list[int]", desc, body, fibs, cases)


def _is_prime_ref(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _prime_lines(var: str, indent: str) -> str:
    lines = (
        f"if {var} < 2:",
        "    return False",
        "i = 2",
        f"while i * i <= {var}:",
        f"    if {var} % i == 0:",
        "        return False",
        "    i += 1",
        "return True",
    )
    return "".join(indent + line + "\n" for line in lines)


def _primes(rng: random.Random) -> Spec:
    p = _pick(rng, "n", "number", "limit")
    v = rng.randrange(3)
    check = _prime_lines(p, "    ")
    if v == 0:
        name = _pick(rng, "check_prime", "prime_test", "is_prime_number")
        desc = f"return True if `{p}` is a prime number and False otherwise"
        cases = ((1,), (2,), (rng.randint(3, 60),), (rng.randint(61, 200),), (-7,))
        return Spec(name, (p,), f"({p}: int) -> bool", desc, check, _is_prime_ref, cases)
    helper = _prime_lines("m", "        ")
    cases = ((0,), (2,), (rng.randint(3, 30),), (rng.randint(31, 100),))
    if v == 1:
        name = _pick(rng, "primes_below", "primes_less_than", "list_primes")
        body = f"    def prime(m):\n{helper}    return [m for m in range(2, {p}) if prime(m)]\n"
        desc = f"return a list of all prime numbers smaller than `{p}`, in increasing order"
        return Spec(
            name,
            (p,),
            f"({p}: int) -> list[int]",
            desc,
            body,
            lambda n: [m for m in range(2, n) if _is_prime_ref(m)],
            cases,
        )
    name = _pick(rng, "count_primes", "prime_count", "num_primes_upto")
    body = f"    def prime(m):\n{helper}    return sum(1 for m in range(2, {p} + 1) if prime(m))\n"
    desc = f"return how many prime numbers are less than or equal to `{p}`"
    return Spec(
        name, (p,), f"({p}: int) -> int", desc, body, lambda n: sum(_is_prime_ref(m) for m in range(2, n + 1)), cases
    )


def _evens(xs: list[int]) -> list[int]:
    return [x for x in xs if x % 2 == 0]


def _odds(xs: list[int]) -> list[int]:
    return [x for x in xs if x % 2 != 0]


def _positives(xs: list[int]) -> list[int]:
    return [x for x in xs if x > 0]


def _filter(rng: random.Random) -> Spec:
    v = rng.randrange(4)
    if v < 3:
        p = _list_param(rng)
        cases = (*tuple((_ints(rng),) for _ in range(3)), ([],))
        cond, what, name, fn = [
            ("x % 2 == 0", "even", _pick(rng, "filter_even", "only_evens", "keep_even"), _evens),
            ("x % 2 != 0", "odd", _pick(rng, "filter_odd", "only_odds", "keep_odd"), _odds),
            ("x > 0", "positive", _pick(rng, "filter_positive", "only_positive", "positives"), _positives),
        ][v]
        body = f"    return [x for x in {p} if {cond}]\n"
        desc = f"return a new list with only the {what} numbers of `{p}`, in their original order"
        return Spec(name, (p,), f"({p}: list[int]) -> list[int]", desc, body, fn, cases)
    k = rng.randint(2, 5)
    p = _pick(rng, "words", "strings", "items")
    name = _pick(rng, f"longer_than_{k}", "long_words", "filter_long")
    body = (
        f"    result = []\n    for w in {p}:\n        if len(w) > {k}:\n            result.append(w)\n"
        f"    return result\n"
    )
    desc = f"return the strings in `{p}` that have more than {k} characters, in their original order"
    cases = tuple((_words(rng, (0, 6)),) for _ in range(3))
    return Spec(
        name, (p,), f"({p}: list[str]) -> list[str]", desc, body, lambda ws: [w for w in ws if len(w) > k], cases
    )


def _dedupe(rng: random.Random) -> Spec:
    p = _list_param(rng)
    v = rng.randrange(3)
    cases = tuple((_ints(rng, 0, 5, (0, 9)),) for _ in range(4))
    if v == 0:
        name = _pick(rng, "remove_duplicates_ordered", "dedupe", "unique_in_order")
        body = (
            f"    seen = set()\n    result = []\n    for x in {p}:\n        if x not in seen:\n"
            f"            seen.add(x)\n            result.append(x)\n    return result\n"
        )
        desc = f"return the elements of `{p}` without duplicates, keeping the first occurrence of each in order"
        return Spec(name, (p,), f"({p}: list[int]) -> list[int]", desc, body, lambda xs: list(dict.fromkeys(xs)), cases)
    if v == 1:
        name = _pick(rng, "count_distinct", "num_unique", "distinct_count")
        body = f"    return len(set({p}))\n"
        desc = f"return the number of distinct values in `{p}`"
        return Spec(name, (p,), f"({p}: list[int]) -> int", desc, body, lambda xs: len(set(xs)), cases)
    name = _pick(rng, "has_duplicates", "contains_duplicate", "any_repeated")
    body = (
        f"    seen = set()\n    for x in {p}:\n        if x in seen:\n            return True\n"
        f"        seen.add(x)\n    return False\n"
    )
    desc = f"return True if some value occurs more than once in `{p}`"
    return Spec(name, (p,), f"({p}: list[int]) -> bool", desc, body, lambda xs: len(set(xs)) != len(xs), cases)


def _words_family(rng: random.Random) -> Spec:
    p = _pick(rng, "sentence", "text", "s")
    v = rng.randrange(3)
    cases = (*tuple((_sentence(rng),) for _ in range(3)), ("",))
    if v == 0:
        name = _pick(rng, "count_words", "word_count", "num_words")
        desc = f"return the number of words in `{p}`, where words are separated by whitespace"
        return Spec(
            name, (p,), f"({p}: str) -> int", desc, f"    return len({p}.split())\n", lambda s: len(s.split()), cases
        )
    if v == 1:
        name = _pick(rng, "capitalize_words", "title_words", "upper_first_letters")
        body = f'    return " ".join(w[0].upper() + w[1:] for w in {p}.split())\n'
        desc = f"return `{p}` with the first letter of every word in upper case, words joined by single spaces"
        return Spec(
            name,
            (p,),
            f"({p}: str) -> str",
            desc,
            body,
            lambda s: " ".join(w[0].upper() + w[1:] for w in s.split()),
            cases,
        )
    name = _pick(rng, "longest_word", "find_longest_word", "max_word")
    body = (
        f'    best = ""\n    for w in {p}.split():\n        if len(w) > len(best):\n            best = w\n'
        f"    return best\n"
    )
    desc = f'return the longest word of `{p}` (the first one if several are equally long; "" if there are none)'

    def ref(s: str) -> str:
        best = ""
        for w in s.split():
            best = w if len(w) > len(best) else best
        return best

    return Spec(name, (p,), f"({p}: str) -> str", desc, body, ref, cases)


def _gcd(rng: random.Random) -> Spec:
    import math

    a, b = rng.choice([("a", "b"), ("x", "y"), ("m", "n")])
    cases = (*tuple((rng.randint(1, 60), rng.randint(1, 60)) for _ in range(3)), (12, 18))
    if rng.randrange(2) == 0:
        name = _pick(rng, "gcd", "greatest_divisor", "euclid_gcd")
        body = f"    while {b}:\n        {a}, {b} = {b}, {a} % {b}\n    return {a}\n"
        desc = f"return the greatest common divisor of the positive integers `{a}` and `{b}` (Euclid's algorithm)"
        return Spec(name, (a, b), f"({a}: int, {b}: int) -> int", desc, body, math.gcd, cases)
    name = _pick(rng, "lcm", "least_common_multiple", "smallest_multiple")
    body = f"    u, v = {a}, {b}\n    while v:\n        u, v = v, u % v\n    return {a} * {b} // u\n"
    desc = f"return the least common multiple of the positive integers `{a}` and `{b}`"
    return Spec(name, (a, b), f"({a}: int, {b}: int) -> int", desc, body, lambda x, y: x * y // math.gcd(x, y), cases)


def _digits(rng: random.Random) -> Spec:
    p = _pick(rng, "n", "number", "num")
    v = rng.randrange(3)
    cases = ((0,), (rng.randint(1, 99),), (rng.randint(100, 99999),), (-rng.randint(1, 999),))
    if v == 0:
        name = _pick(rng, "digit_sum", "sum_of_digits", "add_digits")
        body = (
            f"    {p} = abs({p})\n    total = 0\n    while {p}:\n        total += {p} % 10\n"
            f"        {p} //= 10\n    return total\n"
        )
        desc = f"return the sum of the decimal digits of the integer `{p}` (ignoring its sign)"
        return Spec(name, (p,), f"({p}: int) -> int", desc, body, lambda n: sum(int(d) for d in str(abs(n))), cases)
    if v == 1:
        name = _pick(rng, "count_digits", "num_digits", "digit_count")
        body = f"    return len(str(abs({p})))\n"
        desc = f"return the number of decimal digits of the integer `{p}` (ignoring its sign; 0 has one digit)"
        return Spec(name, (p,), f"({p}: int) -> int", desc, body, lambda n: len(str(abs(n))), cases)
    name = _pick(rng, "reverse_digits", "reverse_number", "flip_integer")
    body = f"    sign = -1 if {p} < 0 else 1\n    return sign * int(str(abs({p}))[::-1])\n"
    desc = f"return the integer `{p}` with its digits reversed, keeping the sign (e.g. -120 gives -21)"
    return Spec(
        name, (p,), f"({p}: int) -> int", desc, body, lambda n: (-1 if n < 0 else 1) * int(str(abs(n))[::-1]), cases
    )


def _frequency(rng: random.Random) -> Spec:
    v = rng.randrange(3)
    if v == 0:
        p = _str_param(rng)
        name = _pick(rng, "char_frequency", "letter_counts", "count_characters")
        body = f"    counts = {{}}\n    for ch in {p}:\n        counts[ch] = counts.get(ch, 0) + 1\n    return counts\n"
        desc = f"return a dictionary mapping each character of `{p}` to the number of times it occurs"

        def ref(s: str) -> dict[str, int]:
            out: dict[str, int] = {}
            for ch in s:
                out[ch] = out.get(ch, 0) + 1
            return out

        cases = (*tuple((w,) for w in _words(rng, (3, 3))), ("",))
        return Spec(name, (p,), f"({p}: str) -> dict[str, int]", desc, body, ref, cases)
    if v == 1:
        p = _list_param(rng)
        name = _pick(rng, "most_common", "mode_of_list", "most_frequent")
        body = (
            f"    counts = {{}}\n    for x in {p}:\n        counts[x] = counts.get(x, 0) + 1\n"
            f"    best = {p}[0]\n    for x in {p}:\n        if counts[x] > counts[best]:\n            best = x\n"
            f"    return best\n"
        )
        desc = f"return the most frequent value in the non-empty list `{p}` (the one seen first if there is a tie)"

        def ref_mode(xs: list[int]) -> int:
            return max(xs, key=lambda x: (xs.count(x), -xs.index(x)))

        cases = tuple((_ints(rng, 0, 4, (1, 9)),) for _ in range(4))
        return Spec(name, (p,), f"({p}: list[int]) -> int", desc, body, ref_mode, cases)
    p = _pick(rng, "text", "sentence", "s")
    name = _pick(rng, "word_frequency", "count_each_word", "word_counts")
    body = (
        f"    counts = {{}}\n    for w in {p}.lower().split():\n        counts[w] = counts.get(w, 0) + 1\n"
        f"    return counts\n"
    )
    desc = (
        f"return a dictionary mapping each lower-cased word of `{p}` (split on whitespace) to its number of occurrences"
    )

    def ref_words(s: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in s.lower().split():
            out[w] = out.get(w, 0) + 1
        return out

    cases = tuple((_sentence(rng),) for _ in range(3))
    return Spec(name, (p,), f"({p}: str) -> dict[str, int]", desc, body, ref_words, cases)


def _sorting(rng: random.Random) -> Spec:
    v = rng.randrange(3)
    if v == 0:
        p = _list_param(rng)
        name = _pick(rng, "is_sorted", "is_non_decreasing", "check_sorted")
        body = (
            f"    for i in range(len({p}) - 1):\n        if {p}[i] > {p}[i + 1]:\n            return False\n"
            f"    return True\n"
        )
        desc = f"return True if the list `{p}` is sorted in non-decreasing order"
        cases = ((sorted(_ints(rng)),), (_ints(rng, n=(2, 6)),), ([],), ([3, 1],))
        return Spec(
            name,
            (p,),
            f"({p}: list[int]) -> bool",
            desc,
            body,
            lambda xs: all(a <= b for a, b in itertools.pairwise(xs)),
            cases,
        )
    if v == 1:
        p = _pick(rng, "words", "strings", "items")
        name = _pick(rng, "sort_by_length", "order_by_length", "length_sorted")
        body = f"    return sorted({p}, key=len)\n"
        desc = f"return the strings of `{p}` sorted by length, shortest first (equal lengths keep their order)"
        cases = tuple((_words(rng, (0, 6)),) for _ in range(3))
        return Spec(name, (p,), f"({p}: list[str]) -> list[str]", desc, body, lambda ws: sorted(ws, key=len), cases)
    p = _list_param(rng)
    name = _pick(rng, "second_largest", "runner_up", "second_max")
    body = f"    distinct = sorted(set({p}))\n    if len(distinct) < 2:\n        return None\n    return distinct[-2]\n"
    desc = f"return the second largest distinct value in `{p}`, or None if there is no such value"
    cases = (*tuple((_ints(rng, 0, 9),) for _ in range(3)), ([4, 4],))
    return Spec(
        name,
        (p,),
        f"({p}: list[int]) -> int | None",
        desc,
        body,
        lambda xs: sorted(set(xs))[-2] if len(set(xs)) > 1 else None,
        cases,
    )


FAMILIES: dict[str, Maker] = {
    "sum": _sum,
    "extremes": _extremes,
    "reverse": _reverse,
    "count_chars": _count_chars,
    "fizzbuzz": _fizzbuzz,
    "palindrome": _palindrome,
    "factorial": _factorial,
    "fibonacci": _fibonacci,
    "primes": _primes,
    "filter": _filter,
    "dedupe": _dedupe,
    "words": _words_family,
    "gcd": _gcd,
    "digits": _digits,
    "frequency": _frequency,
    "sorting": _sorting,
}
CATEGORIES: tuple[str, ...] = tuple(FAMILIES)

_INSTRUCTIONS = (
    "Write a Python function `{call}` that should {desc}.",
    "Implement the Python function `{call}`: it should {desc}.",
    "Create a function named {name} in Python. Given {args}, it should {desc}.",
    "Write Python code for `{call}`. The function must {desc}.",
    "Define {name}({params}) so that it will {desc}.",
)


def _args(s: Spec) -> str:
    q = [f"`{p}`" for p in s.params]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + " and " + q[-1]


def render(spec: Spec, rng: random.Random) -> dict[str, Any]:
    """The row for ``spec``: instruction, code (with a doctest from its first case) and tests."""
    call = f"{spec.name}({', '.join(spec.params)})"
    instruction = rng.choice(_INSTRUCTIONS).format(
        call=call, name=spec.name, params=", ".join(spec.params), desc=spec.desc, args=_args(spec)
    )
    first = spec.cases[0]
    example = f"{spec.name}({', '.join(repr(a) for a in first)})"
    doc = spec.desc[0].upper() + spec.desc[1:] + "."
    code = (
        f'def {spec.name}{spec.signature}:\n    """{doc}\n\n    >>> {example}\n    {spec.ref(*first)!r}\n'
        f'    """\n{spec.body}'
    )
    tests = [f"assert {spec.name}({', '.join(repr(a) for a in c)}) == {spec.ref(*c)!r}" for c in spec.cases]
    return {"instruction": instruction, "input": "", "output": code.rstrip("\n"), "tests": tests}


def generate_code(
    n: int, seed: int = 0, families: Sequence[str] | None = None, *, start: int = 0
) -> list[dict[str, Any]]:
    """``n`` rows (indices ``start .. start+n-1`` of stream ``seed``); see the module docstring."""
    names = list(families) if families is not None else list(CATEGORIES)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"unknown code template families {unknown}; available: {', '.join(CATEGORIES)}")
    rows = []
    for i in range(start, start + n):
        family = names[i % len(names)]
        rng = random.Random(f"code:{seed}:{i}")
        row = render(FAMILIES[family](rng), rng)
        row["category"] = family
        rows.append(row)
    return rows


__all__ = ["CATEGORIES", "FAMILIES", "Spec", "generate_code", "render"]
