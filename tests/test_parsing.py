"""Confidence and yes/no parsing: the awkward replies, the documented rules, no invented numbers."""

import pytest

from csp_utils.vlm.parsing import parse_confidence, parse_yes_no


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


# Replies in the styles the models are documented to use. LLaVA-1.5: short, first person,
# "I am 90% confident that ..."; Qwen2-VL: "Confidence: 85%", parenthesised hedges,
# sometimes Chinese or full-width forms; GPT-4V-like: verbose hedges, numbered lists,
# markdown ("**Confidence:** 85%"), scores out of N and echoed scales.
REAL_REPLIES = [
    # --- LLaVA-1.5 style
    ("llava", "I am 90% confident that there is a dog in the image.", 0.9),
    ("llava", "I am 85% sure that the model's answer is correct.", 0.85),
    ("llava", "I am 100% certain that there is a clock in the image.", 1.0),
    ("llava", "I am certain that there are clearly 3 cats in the image.", None),
    ("llava", "I am very confident that the answer is correct.", None),
    ("llava", "The model's answer is correct. I am 95% confident.", 0.95),
    ("llava", "I'm not 100% certain, but I'd say about 80%.", 0.8),
    ("llava", "I am not 100% sure.", None),
    ("llava", "80%", 0.8),
    ("llava", "I am 70 percent sure that there is a bench in the image.", 0.7),
    ("llava", "I am ninety percent sure that the answer is yes.", 0.9),
    ("llava", "I would say I am seventy-five percent confident.", 0.75),
    ("llava", "The image shows 2 dogs and 1 cat, so I am 90% sure the answer is correct.", 0.9),
    ("llava", "There is a 20% chance that the answer is wrong.", 0.8),
    ("llava", "I am 60% confident. The person is holding an umbrella at 10:30 in the morning.", 0.6),
    ("llava", "I am fairly confident, around 80-90%.", 0.85),
    ("llava", "I am about 70% sure.", 0.7),
    ("llava", "Yes, I am sure.", None),
    # --- Qwen2-VL style
    ("qwen2-vl", "Confidence: 85%", 0.85),
    ("qwen2-vl", "I'm fairly confident (about 80%).", 0.8),
    ("qwen2-vl", "The model's answer is correct. Confidence: 95%", 0.95),
    ("qwen2-vl", "Confidence: 8/10", 0.8),
    ("qwen2-vl", "Confidence (0-100): 85", 0.85),
    ("qwen2-vl", "Confidence: 0.9", 0.9),
    ("qwen2-vl", "置信度：85％", 0.85),
    ("qwen2-vl", "Confidence：９０％", 0.9),
    ("qwen2-vl", "Confidence: 85,5%", 0.855),
    ("qwen2-vl", "I'm fairly confident (between 80% and 90%).", 0.85),
    ("qwen2-vl", "Confidence: 80%-90%", 0.85),
    ("qwen2-vl", "Confidence level: high", None),
    ("qwen2-vl", "Confidence: 85/100", 0.85),
    ("qwen2-vl", "0-10 scale: 7", 0.7),
    ("qwen2-vl", "Confidence: 7", None),  # 7% or 7 out of 10: not said
    ("qwen2-vl", "Yes. Confidence: 0,85", 0.85),
    ("qwen2-vl", "I'm quite sure (90%) that there is a car.", 0.9),
    ("qwen2-vl", "Probability that the answer is correct: 0.75", 0.75),
    # --- GPT-4V-like style
    ("gpt-4v", "**Confidence:** 85%", 0.85),
    ("gpt-4v", "Based on the image, the model's answer appears to be correct.\n\n"
               "1. The object on the left is clearly a bicycle.\n2. The lighting is good.\n\n"
               "**Confidence:** 90%", 0.9),
    ("gpt-4v", "On a scale from 0% to 100%, I'd say 85%.", 0.85),
    ("gpt-4v", "On a scale of 1 to 10, where 10 means absolutely certain, I would rate my confidence as an 8.", 0.8),
    ("gpt-4v", "I'd rate my confidence 4 out of 5.", 0.8),
    ("gpt-4v", "I would give it a confidence of 9 out of 10.", 0.9),
    ("gpt-4v", "While I can't be 100% certain given the image resolution, I would estimate my confidence at around 75%.", 0.75),
    ("gpt-4v", "There's roughly a 15% probability that the model is mistaken, since the object is partly occluded.", 0.85),
    ("gpt-4v", "I'd estimate a 10% chance of the answer being incorrect.", 0.9),
    ("gpt-4v", "I'm highly confident in the model's answer. There is clearly a laptop on the desk.", None),
    ("gpt-4v", "The cat occupies roughly 30% of the image, and I am 80% confident it is a cat.", 0.8),
    ("gpt-4v", "I am at least 90% confident that the model is right.", None),
    ("gpt-4v", "**Assessment:**\n1) The dog is visible.\n2) Its collar is red.\n\n**Confidence level:** Moderate (60-70%)", 0.65),
    ("gpt-4v", "My confidence is 70%. Note that there are 4 people in the background.", 0.7),
    ("gpt-4v", "Confidence: 7/10 — the object is small and partly hidden.", 0.7),
    ("gpt-4v", "It is difficult to say with certainty. There are 2 objects that could be a cup.", None),
    ("gpt-4v", "I'd put it at 0.8.", 0.8),
    ("gpt-4v", "Confidence score (out of 10): 9", 0.9),
    ("gpt-4v", "I cannot be completely certain, but I'd say 70 percent.", 0.7),
    ("gpt-4v", "## Confidence\nEighty-five percent.", 0.85),
    ("gpt-4v", "Uncertainty: 20%", None),
    ("gpt-4v", "The clock shows 3:45 and the scene is a kitchen. Confidence: high.", None),
    ("gpt-4v", "I am over 95% confident.", None),
]


@pytest.mark.parametrize("style, reply, expected", REAL_REPLIES)
def test_realistic_replies(style, reply, expected):
    got = parse_confidence(reply)
    if expected is None:
        assert got is None, (style, reply, got)
    else:
        assert got == pytest.approx(expected, abs=1e-9), (style, reply)


def test_reply_set_covers_the_three_styles():
    styles = {style for style, _, _ in REAL_REPLIES}
    assert styles == {"llava", "qwen2-vl", "gpt-4v"} and len(REAL_REPLIES) >= 50
    assert all(sum(s == style for s, _, _ in REAL_REPLIES) >= 15 for style in styles)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("8/10", 0.8),
        ("4 out of 5", 0.8),
        ("85/100", 0.85),
        ("10/10", 1.0),
        ("four out of five", 0.8),
        ("nine out of ten", 0.9),
        ("12/10", None),                     # above its denominator
        ("2/3 of the objects are visible", None),  # not a rating scale: not a score
        ("Date 12/10/2023. Confidence 80%", 0.8),  # a date is not a score
    ],
)
def test_scores_out_of_n(reply, expected):
    assert parse_confidence(reply) == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Confidence (0-100): 85", 0.85),
        ("Confidence (0\u2013100): 85", 0.85),
        ("Confidence [0, 1]: 0.7", 0.7),
        ("0-10 scale: 7", 0.7),
        ("On a 1-5 scale, 4.", 0.8),
        ("on a scale from 0% to 100%, I'd say 85%", 0.85),
        ("On a scale of 0 to 100, my confidence is 90.", 0.9),
        ("On a scale of 1 to 10, with 10 being certain, I'd say 8", 0.8),
        ("My confidence is about 8 on a scale of 10.", 0.8),
        ("Confidence: 7 (on a scale of 1-10)", 0.7),
        ("Confidence (out of 10): 9", 0.9),
        ("Confidence (0-100):", None),      # the scale alone states nothing
        ("Confidence: 0.8 (0-10 scale)", None),  # a fraction on a 0-10 scale: ambiguous
    ],
)
def test_echoed_scales(reply, expected):
    assert parse_confidence(reply) == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("I'm not 100% sure, but 80%.", 0.8),
        ("I'm not 100% certain", None),
        ("I can't be 100% certain.", None),
        ("I wouldn't say I'm 100% sure; maybe 90%", 0.9),
        ("at least 90% sure", None),
        ("more than 80% confident", None),
        ("over 95%", None),
        ("almost 100% sure", None),
        ("90% or higher", None),
        ("90%+", None),
        ("No, 90%.", 0.9),                  # an answer "No" is not a negation of the number
        ("I'm not sure, maybe 60%.", 0.6),
        ("about 90%", 0.9),                 # an approximation is a value, a bound is not
    ],
)
def test_negated_and_bounding_percents_are_not_the_confidence(reply, expected):
    assert parse_confidence(reply) == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("There is a 20% chance the answer is wrong.", 0.8),
        ("a 20% chance the answer is incorrect", 0.8),
        ("10% chance of error", 0.9),
        ("a 10% chance of a mistake", 0.9),
        ("I am 30% sure the model's answer is incorrect.", 0.7),
        ("The model is 90% likely to be wrong.", 0.1),
        ("I'm 95% sure the answer isn't wrong.", None),      # a double negative: not read
        ("90% sure that there is no error", None),
        ("Uncertainty: 20%", None),
        ("20% uncertain", None),
        ("I'm 85% confident, although there might be an error.", 0.85),  # a contrast ends the clause
        ("Confidence: 90% (so there is a 10% chance of error)", 0.9),
        ("I'm 80% sure that it's not a dog.", 0.8),          # a negation alone does not turn it
    ],
)
def test_inverted_statements(reply, expected):
    assert parse_confidence(reply) == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("I am certain that there are clearly 3 cats.", None),   # a count
        ("Confidence: 3 cats are visible", None),
        ("The clock shows 10:30. I am 70% sure.", 0.7),          # a time
        ("The clock shows 10:30.", None),
        ("1. The dog is visible.\n2) It is brown.\nConfidence: 85%", 0.85),  # list numbers
        ("1. The dog is visible.\n2. It is brown.", None),
        ("The cat covers 30% of the image; I'm 80% sure.", 0.8),  # a proportion
        ("Confidence: 7", None),          # 7% or 7 out of 10: not said
        ("Score: 8", None),
        ("I'd give it a 7.", None),
        ("Confidence: 75\nReason: 2 cats are visible.", 0.75),
        ("1. The cat: 90%\n2. The collar: 60%\nOverall confidence: 75%", 0.75),  # a labelled number wins
    ],
)
def test_numbers_that_are_not_confidences(reply, expected):
    assert parse_confidence(reply) == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("85,5%", 0.855),
        ("0,85", 0.85),
        ("Confidence: 0,9", 0.9),
        ("\uff18\uff15\uff05", 0.85),     # full-width digits and percent sign
        ("85\uff05", 0.85),
        ("85\u066a", 0.85),                # Arabic percent sign
        ("\u6211\u670985%\u7684\u628a\u63e1", 0.85),  # Chinese, no spaces around the number
        ("ninety percent", 0.9),
        ("seventy-five percent", 0.75),
        ("Seventy five per cent", 0.75),
        ("one hundred percent", 1.0),
        ("a hundred percent sure", 1.0),
        ("zero percent", 0.0),
        ("I have one dog, ninety percent sure", 0.9),  # only a number before "percent" is read
        ("80%-90%", 0.85),
        ("80% - 90%", 0.85),
        ("Yes, 80% - 5 objects are visible.", 0.8),
        ("between 80% and 90%", 0.85),
        ("Between 70 and 80 percent.", 0.75),
        ("I like cats and 90% of dogs", None),    # a proportion, and "and" is no range
        ("**Confidence:** 85%", 0.85),
        ("The model is 90% likely to be wrong.", 0.1),  # 1 - 0.9 exactly, no float residue
    ],
)
def test_written_forms(reply, expected):
    assert parse_confidence(reply) == (None if expected is None else pytest.approx(expected, abs=1e-12))


@pytest.mark.parametrize("reply", ["I am very confident", "Highly confident.", "Not very sure.", "fifty-fifty"])
def test_verbal_only_replies_are_missing(reply):
    assert parse_confidence(reply) is None


def test_first_percent_decides_even_when_it_is_rejected():
    # a rule that finds its number and rejects it decides: no fall-through to a later one
    assert parse_confidence("150% or maybe 80%") is None
    assert parse_confidence("80% or maybe 90%") == pytest.approx(0.8)


def test_result_is_always_a_fraction_or_none():
    for percent in range(0, 101):
        for text in (f"{percent}%", f"{percent} percent", f"Confidence: {percent}%"):
            assert parse_confidence(text) == pytest.approx(percent / 100)


def test_any_text_gives_a_fraction_or_none():
    # garbage from an untrained model must neither raise nor leave [0, 1]
    import random

    rng = random.Random(0)
    pieces = ["85", "0.9", "7", "100", "250", "-", "\u2212", "%", "\uff05", "/", "10", "out of", " to ", "and",
              "between", "confidence", ":", " ", "\n", "1.", "scale", "(0-100)", "not", "at least", "wrong",
              "no", "ninety", "percent", ",", "5", "is", "of the image", "\u7f6e\u4fe1\u5ea6", "**", "x"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        got = parse_confidence(text)
        assert got is None or 0.0 <= got <= 1.0, (text, got)


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
