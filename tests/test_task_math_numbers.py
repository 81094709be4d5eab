"""Final-answer extraction and numeric comparison, on hand-checked strings."""

from __future__ import annotations

import pytest

from fedlora.tasks.math.numbers import extract_final_number, normalize_number, numbers_equal

EXTRACT = [
    # GSM8K's marker wins, commas dropped, what follows the marker's number is ignored
    ("She pays 3 x 400 = 1,200 dollars.\n#### 1,200", "1200"),
    ("#### 72\n\nQuestion: next one has 5 apples", "72"),
    ("#### 72 #### 5", "72"),
    ("####-7", "-7"),
    ("#### $45", "45"),
    ("#### Step 1: add\n3 + 4 = 7\n#### 7\nmore 9", "7"),  # a markdown heading is not the marker
    ("#### Step 1: add\n3 + 4 = 7", "7"),
    # currency, units, decimals, trailing punctuation
    ("The total is $1,200.50 dollars.", "1200.5"),
    ("It costs $3.", "3"),
    ("So the answer is 12.0 apples", "12"),
    # "the answer is" beats a later number; the last such phrase counts
    ("The answer is 42. Then 7 more problems follow.", "42"),
    ("The answer is 3, no wait, the answer is: 5 and 9", "5"),
    ("Answer: 18", "18"),
    # otherwise the last number
    ("First 12 + 7 = 19, then 19 + 5 = 24", "24"),
    ("12 - 7 = 5", "5"),  # a binary minus is not a sign
    ("It was -7 degrees at midnight", "-7"),
    ("It was −7 degrees", "-7"),  # Unicode minus
    ("a loss of -$5", "-5"),
    ("pages 10-20", "20"),  # a hyphen after a digit is not a sign
    ("a 1,2345 b", "2345"),  # not a thousands group
    ("12,5", "5"),
    ("about .5 of it", "0.5"),
    ("it is 50%.", "50"),
    ("version abc12", None),  # digits glued to a word are not a number
    ("no digits here", None),
    ("", None),
    ("#### \nthe answer is 9", "9"),  # an empty marker falls back
]


@pytest.mark.parametrize(("text", "expected"), EXTRACT)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_extract_none_input():
    assert extract_final_number(None) is None


@pytest.mark.parametrize(
    ("raw", "norm"),
    [("12", "12"), ("12.0", "12"), ("12.50", "12.5"), ("1,200", "1200"), ("-0", "0"), ("+3", "3"), ("$4", "4"),
     ("7.", "7"), (12, "12"), (2.5, "2.5"), ("abc", None), ("", None), (None, None), ("nan", None), ("inf", None)],
)  # fmt: skip
def test_normalize_number(raw, norm):
    assert normalize_number(raw) == norm


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [("12", "12.0", True), ("1,200", "1200", True), ("12", "12.00", True), (12, "12", True), ("0.5", ".5", True),
     ("-3", "3", False), ("12", "13", False), ("12", None, False), (None, None, False), ("x", "x", False),
     ("1200.5", "1,200.50", True), ("0.1", 0.1, True)],
)  # fmt: skip
def test_numbers_equal(a, b, equal):
    assert numbers_equal(a, b) is equal
