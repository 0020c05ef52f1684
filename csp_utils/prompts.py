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
* ``"inline"``: the answer prompt itself, and the answer and its confidence in ONE assistant
  reply (``PromptConfig.inline_template``, "Yes 80%" by default). The confidence prompt is that
  reply left open right after the answer, so the confidence is read at the positions right
  after the answer tokens (a conversation ending in an assistant turn is continued, not
  closed: :func:`csp_utils.engine.chat_texts`). Framing does not apply.
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
# the inline layout's one reply: the answer, then the confidence (what precedes {confidence},
# trailing whitespace aside, is the open reply the options are scored after)
INLINE_TEMPLATE = "{response} {confidence}"
FRAMINGS = ("third", "first")
LAYOUTS = ("single_turn", "follow_up", "question_first", "inline")
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
    inline_template: str = INLINE_TEMPLATE

    def confidence_template(self, framing: str, layout: str = "single_turn") -> str:
        check_layout(layout)
        if framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
        if layout == "follow_up":
            return self.follow_up_third_template if framing == "third" else self.follow_up_first_template
        if layout == "question_first":
            return self.question_first_third_template if framing == "third" else self.question_first_first_template
        if layout == "inline":
            return self.inline_template
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
    assistant's ``confidence`` reply appended when given. One image slot in every layout.

    ``"inline"``: the answer prompt, then the assistant's open reply (the answer as the inline
    template writes it before the confidence) or, with ``confidence``, the whole reply."""
    if layout == "inline":
        template = (config or PromptConfig()).confidence_template(framing, layout)
        if "{confidence}" not in template:
            raise ValueError(f"the inline template needs a {{confidence}} slot, got {template!r}")
        if confidence is None:
            # continue_final_message drops trailing whitespace: it belongs to the scored options
            reply = template[:template.index("{confidence}")].format(response=response).rstrip()
        else:
            reply = template.format(response=response, confidence=confidence)
        return [user_turn(answer_text(query, config)), assistant_turn(reply)]
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
# cannot read for certain is returned as None ("missing") and counted as such by the
# evaluation; it is never replaced by a default or a guessed number. docs/parsing.md lists
# every rule with examples.
import re as _re
import unicodedata as _unicodedata
from dataclasses import dataclass as _dataclass

_N = r"(?:\d+(?:\.\d+)?|\.\d+)"
_PCT = r"[ \t]*(?:%|percent\b|per[ \t]*cent\b)"
_NUMBER = _re.compile(_N)
_PERCENT_AFTER = _re.compile(_PCT)
_SCORE = _re.compile(rf"(?P<a>{_N})\s*(?:/|out\s+of)\s*(?P<b>{_N})(?![\d/])")
_SCORE_SCALES = (5.0, 10.0, 100.0)
_RANGE = _re.compile(rf"(?P<a>{_N})(?P<pa>{_PCT})?\s*(?P<sep>-|\u2013|\u2014|to\b|and\b)\s*(?P<b>{_N})")
_SIGNS = "-\u2212"

# spelled-out numbers, read only before "percent" / "out of" and after "out of"
_UNITS = "zero one two three four five six seven eight nine".split()
_TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_WORD_NUMBER = _re.compile(
    r"\b(?:(?P<hundred>(?:one|a)\s+hundred)|(?P<tens>" + "|".join(_TENS) + r")(?:[-\s](?P<unit>"
    + "|".join(_UNITS[1:]) + r"))?|(?P<small>" + "|".join(_TEENS + _UNITS) + r"))\b"
)
_WORD_CONTEXT_AFTER = _re.compile(rf"(?:{_PCT}|\s*out\s+of\b)")

# echoed scales: "(0-100)", "[0, 1]", "0-10 scale", "on a scale of 1 to 10", "from 0% to 100%", "out of 10"
_LO, _HI = r"(?P<lo>[01])(?:\.0)?\s*%?", r"(?P<hi>100|10|5|1)(?:\.0)?\s*%?"
_TO = r"\s*(?:-|\u2013|\u2014|to|,)\s*"
_SCALES = tuple(_re.compile(p) for p in (
    rf"scale\s+(?:of|from)\s+{_LO}{_TO}{_HI}",
    rf"{_LO}{_TO}{_HI}(?:[-\s]point)?\s+scale\b",
    rf"[(\[]\s*{_LO}{_TO}{_HI}\s*[)\]]",
    rf"\bfrom\s+{_LO}{_TO}{_HI}(?!\s*\d)",
    rf"scale\s+of\s+{_HI}(?!\s*(?:-|to|\d))",
    rf"(?<![\d\s])\s*\(?\bout\s+of\s+{_HI}\)?",
))
# a scale's own explanation: "10 being certain", "where 10 means", "0 = not at all"
_SCALE_NOTE = _re.compile(rf"\b{_N}\s*%?\s+(?:being|means|is|represents|indicates)\b|\b{_N}\s*%?\s*=\s*[a-z]")
_LIST_MARKER = _re.compile(r"(?m)^[ \t]*(?:[1-9]|1\d)[.)](?=[ \t]+\S)")
_CLOCK = _re.compile(r"\b\d{1,2}:\d{2}\b")
_DECIMAL_COMMA = _re.compile(r"(?<![\d,.])(\d+),(\d{1,2})(?![\d,])")

_KEYWORD = r"(?:confiden\w*|certain\w*|probability|likelihood|score|rating|\u7f6e\u4fe1\u5ea6)"
_APPROX = r"(?:\(|about|around|approximately|roughly|~|\u2248|an?)?"
_LABEL = _re.compile(
    rf"(?:\b{_KEYWORD}(?:\s+(?:level|score|rating|estimate))?\s*(?:[:=]|\bis\b|\bof\b|\bat\b|\bas\b|\bwould\s+be\b)?"
    rf"|\b{_KEYWORD}\b[^\n.;!?:\d]{{0,40}}[:=]"
    r"|\bi(?:'d|\s+would)\s+(?:say|estimate|guess|go\s+with|put\s+it\s+at|give\s+it(?:\s+an?)?"
    r"|rate\s+(?:it|this|my\s+confidence)(?:\s+(?:at|as))?))"
    rf"\s*{_APPROX}\s*$"
)
_INVERSE_LABEL = _re.compile(r"\b(?:uncertain\w*|doubt\w*|error\s+rate|risk)\b[^\n.;!?\d]{0,30}$")
_NEGATION = _re.compile(r"(?:\bnot|n't|\bnever|\bcannot|\bhardly)(?:\s+[\w']+){0,2}\s*$")
_BOUND_BEFORE = _re.compile(
    r"(?:\b(?:less|fewer|more|greater|higher|lower)\s+than|\bunder|\bbelow|\bover|\babove|\bat\s+least"
    r"|\bat\s+most|\bup\s+to|\balmost|\bnearly|\bupwards\s+of|\bin\s+excess\s+of|[<>\u2264\u2265]=?)\s*$"
)
_BOUND_AFTER = _re.compile(
    r"\s*(?:\+|or\s+(?:more|higher|greater|above|better|over|less|lower|below|under)\b|at\s+(?:least|most)\b|plus\b)"
)
_PROPORTION_AFTER = _re.compile(r"\s*of\s+(?!the\s+time\b|confidence\b|certainty\b)\w")
_DOUBT_AFTER = _re.compile(r"\s*(?:of\s+)?(?:uncertain\w*|unsure|doubt\w*|unlikely|risk)\b")
_CLAUSE_END = _re.compile(r"[!?;\n\d]|\.(?!\d)|\b(?:but|though|although|however|yet|while|whereas)\b")
_ERROR_WORD = _re.compile(
    r"\b(?:wrong|incorrect|mistaken|mistakes?|inaccurate|erroneous|errors?|false|hallucinat\w*)\b"
)
_NEGATION_WORD = _re.compile(r"\b(?:not|no|never|nothing)\b|n't\b")
_SENTENCE_BREAK = _re.compile(r"[!?;\n]|\.(?!\d)")
_FOLLOW_OK = _re.compile(
    r"[ \t]*(?:$|\n|[^\w\s]|(?:confiden\w*|certain\w*|sure|and|or|but|because|since|as|so|given|based|on|for|with"
    r"|though|i)\b)"
)


def _normalize(text: str) -> str:
    """Full-width forms folded (NFKC: "８５％" -> "85%"), lower case, markdown emphasis
    dropped, spelled-out numbers before "percent" / around "out of" written as digits."""
    s = _unicodedata.normalize("NFKC", str(text)).replace("\u066a", "%").lower()
    s = _re.sub(r"[*_`#]", "", s)

    def digits(m):
        context_before = s[max(0, m.start() - 7):m.start()]
        if not (_WORD_CONTEXT_AFTER.match(s, m.end()) or _re.search(r"out\s+of\s+$", context_before)):
            return m.group(0)
        if m.group("hundred"):
            return "100"
        if m.group("tens"):
            return str(10 * (_TENS.index(m.group("tens")) + 2) + (_UNITS.index(m.group("unit")) if m.group("unit") else 0))
        small = m.group("small")
        return str(_TEENS.index(small) + 10 if small in _TEENS else _UNITS.index(small))

    return _WORD_NUMBER.sub(digits, s)


def _blank(s: str, m) -> str:
    return s[: m.start()] + " " * (m.end() - m.start()) + s[m.end():]


def _mask(s: str) -> tuple[str, float | None, int]:
    """Blank out what is never a stated confidence; return the text, the echoed scale's top
    (None without one) and where the scale ends (a bare number after it, in the same
    sentence, is read on that scale)."""
    scale, scale_end = None, -1
    found = [m for m in (p.search(s) for p in _SCALES) if m is not None]
    if found:
        m = min(found, key=lambda m: m.start())
        scale, scale_end = float(m.group("hi")), m.end()
        s = _blank(s, m)
        for note in list(_SCALE_NOTE.finditer(s)):
            s = _blank(s, note)
    for pattern in (_LIST_MARKER, _CLOCK):
        for m in list(pattern.finditer(s)):
            s = _blank(s, m)
    s = _DECIMAL_COMMA.sub(r"\1.\2", s)  # same length: positions stay valid
    return s, scale, scale_end


@_dataclass
class _Candidate:
    start: int
    end: int
    kind: str               # "percent" | "score" | "bare"
    a: float
    b: float | None = None  # a range's second number or a score's denominator
    negative: bool = False


def _candidates(s: str):
    """Every number in ``s`` read as a score ("8/10"), a percent or a bare number, with
    ranges ("80-90%", "between 80 and 90%") joined; digits glued to Latin letters ("v2",
    "2nd") are skipped, while CJK text, written without spaces, keeps its numbers."""
    pos = 0
    while (m := _NUMBER.search(s, pos)) is not None:
        start = m.start()
        before = s[start - 1] if start else " "
        if (before.isascii() and before.isalnum()) or before in "_.":
            pos = m.end()
            continue
        negative = before in _SIGNS and not (start > 1 and s[start - 2].isalnum())
        score, rng = _SCORE.match(s, start), _RANGE.match(s, start)
        if rng is not None and rng.group("sep") == "and" and not _re.search(r"between\s*$", s[:start]):
            rng = None
        if rng is not None and rng.group("pa") and not _PERCENT_AFTER.match(s, rng.end()):
            rng = None  # "80% - 5 cats": a percent, then something else
        if score is not None and float(score.group("b")) in _SCORE_SCALES:
            cand = _Candidate(start, score.end(), "score", float(score.group("a")), float(score.group("b")))
        elif rng is not None:
            cand = _Candidate(start, rng.end(), "bare", float(rng.group("a")), float(rng.group("b")), negative)
        else:
            cand = _Candidate(start, m.end(), "bare", float(m.group()), None, negative)
        pct = _PERCENT_AFTER.match(s, cand.end)
        if cand.kind == "bare" and pct is not None:
            cand.kind, cand.end = "percent", pct.end()
        elif cand.kind == "bare" and cand.end < len(s) and s[cand.end].isascii() and s[cand.end].isalpha():
            pos = cand.end
            continue  # "2nd", "3d"
        pos = cand.end
        yield cand


def _value(c: _Candidate, scale: float | None) -> float | None:
    """The fraction a candidate states, or None when it is out of range or ambiguous."""
    if c.negative:
        return None
    if c.kind == "score":
        return c.a / c.b if 0 <= c.a <= c.b else None
    if c.b is not None and c.b < c.a:
        return None  # "90-80%" is not a range we trust
    v = c.a if c.b is None else (c.a + c.b) / 2
    if c.kind == "percent":
        return v / 100 if v <= 100 else None
    if scale is not None:
        if scale > 1 and 0 < v < 1:
            return None  # 0.8 on a 0-10 scale: a fraction or a tiny score?
        return v / scale if v <= scale else None
    if v <= 1:
        return v          # a bare 0.85 (or 1) is a fraction
    if v <= 10:
        return None       # a bare 8: 8% or 8 out of 10?
    return v / 100 if v <= 100 else None


def _clause_after(s: str, end: int) -> str:
    m = _CLAUSE_END.search(s, end)
    return s[end: m.start() if m else len(s)]


def parse_confidence(text: str | None) -> float | None:
    """Read a verbalized confidence as a fraction in [0, 1]; None when it cannot be read.

    The rules (docs/parsing.md has the full table with examples), case-insensitive:

    0. **Normalise**: full-width forms (``"８５％"``), markdown (``"**Confidence:** 85%"``),
       spelled-out numbers before ``percent`` or around ``out of`` (``"ninety percent"``,
       ``"four out of five"``), decimal commas (``"85,5%"`` -> 85.5%).
    1. **Not confidences** (blanked): an echoed scale (``"(0-100)"``, ``"0-10 scale"``,
       ``"on a scale of 1 to 10"``, ``"from 0% to 100%"``, ``"(out of 10)"``; its top is
       kept as the scale), the scale's explanation (``"10 being certain"``), list numbers
       at the start of a line (``"1. "``, ``"2) "``), clock times (``"10:30"``).
    2. **Candidates**, left to right: a score ``A/B`` or ``A out of B`` with B in
       {5, 10, 100} -> A/B; a number or range followed by ``%``/``percent`` -> /100; a bare
       number or range only when *labelled* (right after ``confidence``/``certainty``/
       ``probability``/``likelihood``/``score``/``rating`` with ``:``, ``is``, ``of``,
       ``at``; after ``"<keyword> ...:"``; after ``"I'd say"``, ``"I'd rate it"``; after an
       echoed scale in the same sentence) or when the reply is that number alone. A range
       (``"80-90%"``, ``"80%-90%"``, ``"between 80% and 90%"``) gives its midpoint.
    3. **Dropped** (as if absent): a number negated (``"not 100% sure"``, ``"can't be
       100% certain"``) or used as a bound (``"at least 90%"``, ``"over 90%"``, ``"almost
       100%"``, ``"90% or more"``), a proportion (``"30% of the image"``), a labelled bare
       number followed by a word (``"Confidence: 3 cats"``).
    4. **Turned**: a number whose clause calls the answer wrong (``"a 20% chance the answer
       is wrong"``, ``"10% chance of error"``) gives 1 - p; with a negation in that clause
       too (``"90% sure it is not wrong"``), or a number of doubt (``"20% uncertain"``,
       ``"Uncertainty: 20%"``), None.
    5. **Pick**: the first labelled candidate, else the first candidate; it decides even
       when it is rejected (no fall-through to a later number).
    6. **Values**: a percent above 100, a negative number, an inverted range, a score above
       its denominator -> None. A bare number on an echoed scale is read on it (7 on 0-10
       -> 0.7); otherwise in [0, 1] it is a fraction, in (10, 100] a percent, and in
       (1, 10] ambiguous (8% or 8/10?) -> None.

    Replies with no number (``"I am very confident"``) are None.
    """
    if text is None:
        return None
    s, scale, scale_end = _mask(_normalize(text))
    if not s.strip():
        return None
    labelled, found = [], []
    for c in _candidates(s):
        before = s[max(0, c.start - 80):c.start].rstrip(_SIGNS)
        clause_before = _re.split(r"[.,;:!?\n()]", before)[-1]
        if _NEGATION.search(clause_before) or _BOUND_BEFORE.search(clause_before) or _BOUND_AFTER.match(s, c.end):
            continue
        if c.kind == "percent" and _PROPORTION_AFTER.match(s, c.end):
            continue
        by_scale = scale is not None and c.start >= scale_end and not _SENTENCE_BREAK.search(s, scale_end, c.start)
        is_labelled = bool(_LABEL.search(before)) or by_scale
        if c.kind == "bare" and not (is_labelled or _only_number(s, c)):
            continue
        if c.kind == "bare" and not _FOLLOW_OK.match(s, c.end):
            continue
        value = _value(c, scale)
        clause = _clause_after(s, c.end)
        if value is not None and _ERROR_WORD.search(clause):
            value = None if _NEGATION_WORD.search(clause) else 1 - value
        elif _INVERSE_LABEL.search(before) or _DOUBT_AFTER.match(s, c.end):
            value = None
        (labelled if is_labelled else found).append(value)
    picked = labelled or found
    if not picked or picked[0] is None:
        return None
    return round(picked[0], 10)  # 1 - 0.9 -> 0.1, not 0.09999999999999998


def _only_number(s: str, c: _Candidate) -> bool:
    return not (s[: c.start] + s[c.end:]).strip(" \t\n.!,;:\"'()[]")


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
