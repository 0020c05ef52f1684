"""Confidence and yes/no parsing: the awkward replies, the documented rules, no invented numbers."""

import pytest

from csp_utils.prompts import parse_confidence, parse_yes_no


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("85%", 0.85),
        ("85 %", 0.85),
        ("0.85", 0.85),
        ("85 percent", 0.85),
        ("85 per cent", 0.85),
        ("I am 85% sure", 0.85),
        ("I am 85% sure.", 0.85),
        ("Confidence: 85", 0.85),
        ("Confidence: 0.7", 0.7),
        ("confidence level: 70", 0.7),
        ("I am certain: 95", 0.95),
        ("100%", 1.0),
        ("0%", 0.0),
        ("0 %", 0.0),
        (".9", 0.9),
        ("85", 0.85),
        ("1", 1.0),            # a bare number in [0, 1] is a fraction
        ("0", 0.0),
        ("0.5.", 0.5),
        ("  90%\n", 0.9),
        ("Yes, 100%.", 1.0),
        ("Yes - 90%", 0.9),    # a dash after a word is not a minus sign
        ("Yes-90%", 0.9),
        ("The answer is 3. Confidence: 80%", 0.8),  # the percent sign wins over an earlier number
        ("v2 says 85%", 0.85),  # digits glued to a word are not numbers
        ("1%", 0.01),          # with a percent sign the number is a percent, however small
    ],
)
def test_confidence_replies(reply, expected):
    assert parse_confidence(reply) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("80-90%", 0.85),
        ("80 - 90 %", 0.85),
        ("80 to 90 percent", 0.85),
        ("80\u201390%", 0.85),
        ("Confidence: 0.7-0.9", 0.8),
    ],
)
def test_ranges_give_their_midpoint(reply, expected):
    assert parse_confidence(reply) == pytest.approx(expected)


@pytest.mark.parametrize(
    "reply",
    [
        "150%",                     # above 100%: rejected, not clamped
        "Confidence: 250",
        "101 percent",
        "-5%",                      # negative: rejected
        "\u221210%",
        "Confidence: -0.3",
        "90-80%",                   # an inverted range
        "I am not sure",            # no number
        "confidence is high",
        "There are 3 circles.",     # a number that is not said to be a confidence
        "Yes",
        "",
        "   ",
        None,
    ],
)
def test_unreadable_replies_are_missing(reply):
    assert parse_confidence(reply) is None


def test_first_percent_decides_even_when_it_is_rejected():
    # a rule that finds its number and rejects it decides: no fall-through to a later one
    assert parse_confidence("150% or maybe 80%") is None
    assert parse_confidence("80% or maybe 90%") == pytest.approx(0.8)


def test_result_is_always_a_fraction_or_none():
    for percent in range(0, 101):
        for text in (f"{percent}%", f"{percent} percent", f"Confidence: {percent}%"):
            assert parse_confidence(text) == pytest.approx(percent / 100)


@pytest.mark.parametrize(
    "reply, family, expected",
    [
        ("Yes", "pope", "yes"),
        ("No.", "pope", "no"),
        ("There is not a dog.", "pope", "no"),
        ("xq zz", "pope", "yes"),          # POPE's official rule: anything without no/not is yes
        ("Yes", "amber", "yes"),
        ("No, there isn't", "amber", "no"),
        ("There is no dog", None, "no"),
        ("yes, there is", "world", "yes"),
        ("There is a dog", "amber", None),  # no explicit answer: unreadable outside POPE
        ("xq zz", None, None),
        (None, "pope", None),
    ],
)
def test_yes_no(reply, family, expected):
    assert parse_yes_no(reply, family=family) == expected
