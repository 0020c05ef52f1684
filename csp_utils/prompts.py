"""Prompt templates and chat messages for answers and verbalized confidence.

Third person is the paper's wording and the default; first person is kept for the
comparison. The confidence question comes in one of three layouts (training rows and the
evaluation build it with the same :func:`confidence_messages`):

* ``"single_turn"`` (the paper's): one user turn with the image and the confidence template.
* ``"follow_up"``: the answer conversation (answer prompt with the image, the quoted answer
  as the assistant's reply), then a text-only user turn asking how certain that answer is,
  so the states the model had when it answered are in context.
* ``"question_first"``: one user turn whose text ends with the question, so that the image
  tokens follow the question as closely as the chat template allows (as in the answer prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

ANSWER_TEMPLATE = "{query} Answer with Yes or No."
THIRD_PERSON_TEMPLATE = (
    "A Language model was asked: {query}, Model's answer was {response}. "
    "How certain are you about model's answer?"
)
FIRST_PERSON_TEMPLATE = (
    "You were asked: {query}, Your answer was {response}. How certain are you about your answer?"
)
FOLLOW_UP_THIRD_TEMPLATE = "How certain are you that the model's answer is correct?"
FOLLOW_UP_FIRST_TEMPLATE = "How certain are you that your answer is correct?"
QUESTION_FIRST_THIRD_TEMPLATE = (
    "Model's answer was {response}. How certain are you about model's answer to this question? {query}"
)
QUESTION_FIRST_FIRST_TEMPLATE = (
    "Your answer was {response}. How certain are you about your answer to this question? {query}"
)
FRAMINGS = ("third", "first")
LAYOUTS = ("single_turn", "follow_up", "question_first")
CONFIDENCE_LEVELS = tuple(range(0, 101, 10))  # integer percents


@dataclass
class PromptConfig:
    answer_template: str = ANSWER_TEMPLATE
    third_person_template: str = THIRD_PERSON_TEMPLATE
    first_person_template: str = FIRST_PERSON_TEMPLATE
    follow_up_third_template: str = FOLLOW_UP_THIRD_TEMPLATE
    follow_up_first_template: str = FOLLOW_UP_FIRST_TEMPLATE
    question_first_third_template: str = QUESTION_FIRST_THIRD_TEMPLATE
    question_first_first_template: str = QUESTION_FIRST_FIRST_TEMPLATE

    def confidence_template(self, framing: str, layout: str = "single_turn") -> str:
        check_layout(layout)
        if framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
        if layout == "follow_up":
            return self.follow_up_third_template if framing == "third" else self.follow_up_first_template
        if layout == "question_first":
            return self.question_first_third_template if framing == "third" else self.question_first_first_template
        return self.third_person_template if framing == "third" else self.first_person_template


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def answer_text(query: str, config: PromptConfig | None = None) -> str:
    return (config or PromptConfig()).answer_template.format(query=query)


def confidence_text(query: str, response: str, framing: str = "third", config: PromptConfig | None = None,
                    layout: str = "single_turn") -> str:
    """The text of the (last) user turn that asks for confidence."""
    return (config or PromptConfig()).confidence_template(framing, layout).format(query=query, response=response)


def format_confidence(percent: int) -> str:
    """The verbalized confidence a model is trained to say: an integer percent, ``"85%"``."""
    if not isinstance(percent, (int,)) or isinstance(percent, bool) or not 0 <= percent <= 100:
        raise ValueError(f"confidence must be an integer percent in 0..100, got {percent!r}")
    return f"{percent}%"


def user_turn(text: str, with_image: bool = True) -> dict:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def assistant_turn(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def answer_messages(query: str, answer: str | None = None, config: PromptConfig | None = None) -> list[dict]:
    msgs = [user_turn(answer_text(query, config))]
    if answer is not None:
        msgs.append(assistant_turn(answer))
    return msgs


def confidence_messages(
    query: str, response: str, confidence: str | None = None, framing: str = "third", config: PromptConfig | None = None,
    layout: str = "single_turn",
) -> list[dict]:
    """The confidence conversation in ``layout`` (see the module docstring), with the
    assistant's ``confidence`` reply appended when given. One image slot in every layout."""
    text = confidence_text(query, response, framing, config, layout)
    if layout == "follow_up":
        msgs = answer_messages(query, response, config) + [user_turn(text, with_image=False)]
    elif layout == "question_first":
        # text, then the image: the question ends the text right before the image tokens
        msgs = [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image"}]}]
    else:
        msgs = [user_turn(text)]
    if confidence is not None:
        msgs.append(assistant_turn(confidence))
    return msgs


def corpus_lines() -> list[str]:
    """Template text for the embedded tokenizer's BPE training."""
    lines = []
    for tpl in (ANSWER_TEMPLATE, THIRD_PERSON_TEMPLATE, FIRST_PERSON_TEMPLATE):
        lines.append(tpl.format(query="Is there a circle in the image?", response="Yes"))
        lines.append(tpl.format(query="Is the red square left of the star?", response="No"))
    lines += ["What objects are in the image?", "Is there a", "in this image?", "Is the", "left of",
              "right of", "above", "below", "touching", "small", "large", "How many", "are there"]
    return lines * 10


# --------------------------------------------------------------------- confidence parsing
# A parsed confidence must be something the model actually said. Anything the rules below
# cannot read is returned as None ("missing") and counted as such by the evaluation; it is
# never replaced by a default number.
import re as _re

_NUM = r"\d+(?:\.\d+)?|\.\d+"
# A number or a range of numbers ("80-90", "80 to 90"), with the sign checked separately.
_VALUE = _re.compile(
    rf"(?P<sign>[-\u2212])?(?P<a>{_NUM})(?:\s*(?:-|\u2013|\u2014|to)\s*(?P<b>{_NUM}))?"
)
_PERCENT_AFTER = _re.compile(r"\s*(?:%|percent\b|per\s+cent\b)")
_KEYWORD = _re.compile(r"confiden\w*|certain\w*|probability")


def _number_matches(text: str):
    """Numbers in ``text`` left to right, skipping digits glued to letters ("v2", "h3x").

    A minus sign counts only when it touches the number and follows no letter or digit:
    "-5%" is negative, "Yes - 90%" and "Yes-90%" are not.
    """
    for m in _VALUE.finditer(text):
        before = text[m.start() - 1] if m.start() > 0 else " "
        if before.isalnum() or before == "_":
            if m.group("sign") is None:
                continue  # digits glued to a word
            m = _VALUE.match(text, m.start("a"))  # a hyphen after a word, not a sign
        yield m


def _value_of(m) -> float | None:
    """The number (or a range's midpoint) a match stands for; None when negative or inverted."""
    if m.group("sign") is not None:
        return None  # a negative confidence is not a confidence
    a = float(m.group("a"))
    if m.group("b") is None:
        return a
    b = float(m.group("b"))
    return (a + b) / 2 if a <= b else None  # "90-80%" is not a range we trust


def _as_fraction(value: float | None, percent: bool) -> float | None:
    if value is None:
        return None
    if percent:
        return value / 100 if 0 <= value <= 100 else None
    if 0 <= value <= 1:
        return value          # a bare 0.85 (or 1) reads as a fraction
    if 1 < value <= 100:
        return value / 100    # a bare 85 reads as a percent
    return None


def parse_confidence(text: str | None) -> float | None:
    """Read a verbalized confidence as a fraction in [0, 1]; None when it cannot be read.

    Rules, tried in order (case-insensitive):

    1. **Percent sign wins.** The first number followed by ``%``, ``percent`` or
       ``per cent`` is a percent: ``"85%"``, ``"85 %"``, ``"I am 85% sure"``,
       ``"85 percent"`` -> 0.85; ``"0%"`` -> 0.0, ``"100%"`` -> 1.0.
    2. **After a keyword.** Else the first number after ``confidence``/``confident``,
       ``certain``/``certainty`` or ``probability``: ``"Confidence: 85"`` -> 0.85,
       ``"Confidence: 0.7"`` -> 0.7.
    3. **A bare number.** Else a reply that is a number and nothing else (trailing
       punctuation allowed): ``"0.85"``, ``".9"``, ``"85"``. A number mentioned in a
       sentence without a percent sign or keyword ("There are 3 circles.") is *not* a
       confidence: None.

    Interpretation of a number without a percent sign (rules 2, 3): in [0, 1] it is a
    fraction (so ``"1"`` is 100% and ``"0.5"`` is 50%), in (1, 100] a percent.

    Rejections (None, never clamped, because clamping would invent a number the model did
    not say): values above 100% (``"150%"``, ``"Confidence: 250"``); negative values
    (``"-5%"``); no number at all (``"I am not sure"``, ``""``, None). A rule that finds
    its number but rejects it decides the reply: we do not fall through to a later number.

    Ranges (``"80-90%"``, ``"80 to 90 percent"``, ``"Confidence: 0.7-0.9"``) give their
    midpoint (0.85, 0.8), read with the same rules; an inverted range (``"90-80%"``) is
    None. Decimal commas (``"0,85"``) are not read.
    """
    if text is None:
        return None
    s = str(text).strip().lower()
    if not s:
        return None
    matches = list(_number_matches(s))
    # 1. the first number followed by a percent sign / word
    for m in matches:
        if _PERCENT_AFTER.match(s, m.end()):
            return _as_fraction(_value_of(m), percent=True)
    # 2. the first number after a confidence keyword
    kw = _KEYWORD.search(s)
    if kw is not None:
        for m in matches:
            if m.start() >= kw.end():
                return _as_fraction(_value_of(m), percent=False)
    # 3. a reply that is only a number
    if len(matches) == 1:
        m = matches[0]
        rest = (s[: m.start()] + s[m.end():]).strip(" \t\n.!,;:\"'")
        if not rest:
            return _as_fraction(_value_of(m), percent=False)
    return None


def parse_yes_no(text: str | None, family: str | None = None) -> str | None:
    """Read a yes/no answer reply as ``"yes"``, ``"no"`` or None (not readable).

    Reuses the benchmark rules of :mod:`csp_utils.benchmarks`:

    * ``family="pope"``: POPE's official rule (``benchmarks.pope_parse``: the first
      sentence holds "No"/"not"/"no" -> "no", anything else -> "yes"), so POPE numbers
      match the published scorer. It never returns None.
    * any other family (``"amber"``, the world sets, None): the documented lenient rule
      ``benchmarks.normalize_yes_no`` ("Yes." / "yes, there is" -> yes, "No, there isn't" /
      "There is no dog" -> no, "There is a dog" -> None). AMBER's official exact-match
      score of the raw replies stays available as ``benchmarks.score_amber``.
    """
    if text is None:
        return None
    from csp_utils import benchmarks

    if family == "pope":
        return benchmarks.pope_parse(text)
    r = benchmarks.normalize_yes_no(text)
    return r.lower() if r is not None else None
