"""Reading a model's reply: the verbalized confidence and the yes/no answer.

A parsed confidence must be something the model actually said. Anything the rules below
cannot read for certain is returned as None ("missing") and counted as such by the
evaluation; it is never replaced by a default or a guessed number. docs/parsing.md lists
every rule with examples.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from csp_utils.world import benchmarks

_N = r"(?:\d+(?:\.\d+)?|\.\d+)"
_PCT = r"[ \t]*(?:%|percent\b|per[ \t]*cent\b)"
_NUMBER = re.compile(_N)
_PERCENT_AFTER = re.compile(_PCT)
_SCORE = re.compile(rf"(?P<a>{_N})\s*(?:/|out\s+of)\s*(?P<b>{_N})(?![\d/])")
_SCORE_SCALES = (5.0, 10.0, 100.0)
_RANGE = re.compile(rf"(?P<a>{_N})(?P<pa>{_PCT})?\s*(?P<sep>-|\u2013|\u2014|to\b|and\b)\s*(?P<b>{_N})")
_SIGNS = "-\u2212"

# spelled-out numbers, read only before "percent" / "out of" and after "out of"
_UNITS = "zero one two three four five six seven eight nine".split()
_TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_WORD_NUMBER = re.compile(
    r"\b(?:(?P<hundred>(?:one|a)\s+hundred)|(?P<tens>" + "|".join(_TENS) + r")(?:[-\s](?P<unit>"
    + "|".join(_UNITS[1:]) + r"))?|(?P<small>" + "|".join(_TEENS + _UNITS) + r"))\b"
)
_WORD_CONTEXT_AFTER = re.compile(rf"(?:{_PCT}|\s*out\s+of\b)")

# echoed scales: "(0-100)", "[0, 1]", "0-10 scale", "on a scale of 1 to 10", "from 0% to 100%", "out of 10"
_LO, _HI = r"(?P<lo>[01])(?:\.0)?\s*%?", r"(?P<hi>100|10|5|1)(?:\.0)?\s*%?"
_TO = r"\s*(?:-|\u2013|\u2014|to|,)\s*"
_SCALES = tuple(re.compile(p) for p in (
    rf"scale\s+(?:of|from)\s+{_LO}{_TO}{_HI}",
    rf"{_LO}{_TO}{_HI}(?:[-\s]point)?\s+scale\b",
    rf"[(\[]\s*{_LO}{_TO}{_HI}\s*[)\]]",
    rf"\bfrom\s+{_LO}{_TO}{_HI}(?!\s*\d)",
    rf"scale\s+of\s+{_HI}(?!\s*(?:-|to|\d))",
    rf"(?<![\d\s])\s*\(?\bout\s+of\s+{_HI}\)?",
))
# a scale's own explanation: "10 being certain", "where 10 means", "0 = not at all"
_SCALE_NOTE = re.compile(rf"\b{_N}\s*%?\s+(?:being|means|is|represents|indicates)\b|\b{_N}\s*%?\s*=\s*[a-z]")
_LIST_MARKER = re.compile(r"(?m)^[ \t]*(?:[1-9]|1\d)[.)](?=[ \t]+\S)")
_CLOCK = re.compile(r"\b\d{1,2}:\d{2}\b")
_DECIMAL_COMMA = re.compile(r"(?<![\d,.])(\d+),(\d{1,2})(?![\d,])")

_KEYWORD = r"(?:confiden\w*|certain\w*|probability|likelihood|score|rating|\u7f6e\u4fe1\u5ea6)"
_APPROX = r"(?:\(|about|around|approximately|roughly|~|\u2248|an?)?"
_LABEL = re.compile(
    rf"(?:\b{_KEYWORD}(?:\s+(?:level|score|rating|estimate))?\s*(?:[:=]|\bis\b|\bof\b|\bat\b|\bas\b|\bwould\s+be\b)?"
    rf"|\b{_KEYWORD}\b[^\n.;!?:\d]{{0,40}}[:=]"
    r"|\bi(?:'d|\s+would)\s+(?:say|estimate|guess|go\s+with|put\s+it\s+at|give\s+it(?:\s+an?)?"
    r"|rate\s+(?:it|this|my\s+confidence)(?:\s+(?:at|as))?))"
    rf"\s*{_APPROX}\s*$"
)
_INVERSE_LABEL = re.compile(r"\b(?:uncertain\w*|doubt\w*|error\s+rate|risk)\b[^\n.;!?\d]{0,30}$")
_NEGATION = re.compile(r"(?:\bnot|n't|\bnever|\bcannot|\bhardly)(?:\s+[\w']+){0,2}\s*$")
_BOUND_BEFORE = re.compile(
    r"(?:\b(?:less|fewer|more|greater|higher|lower)\s+than|\bunder|\bbelow|\bover|\babove|\bat\s+least"
    r"|\bat\s+most|\bup\s+to|\balmost|\bnearly|\bupwards\s+of|\bin\s+excess\s+of|[<>\u2264\u2265]=?)\s*$"
)
_BOUND_AFTER = re.compile(
    r"\s*(?:\+|or\s+(?:more|higher|greater|above|better|over|less|lower|below|under)\b|at\s+(?:least|most)\b|plus\b)"
)
_PROPORTION_AFTER = re.compile(r"\s*of\s+(?!the\s+time\b|confidence\b|certainty\b)\w")
_DOUBT_AFTER = re.compile(r"\s*(?:of\s+)?(?:uncertain\w*|unsure|doubt\w*|unlikely|risk)\b")
_CLAUSE_END = re.compile(r"[!?;\n\d]|\.(?!\d)|\b(?:but|though|although|however|yet|while|whereas)\b")
_ERROR_WORD = re.compile(
    r"\b(?:wrong|incorrect|mistaken|mistakes?|inaccurate|erroneous|errors?|false|hallucinat\w*)\b"
)
_NEGATION_WORD = re.compile(r"\b(?:not|no|never|nothing)\b|n't\b")
_SENTENCE_BREAK = re.compile(r"[!?;\n]|\.(?!\d)")
_FOLLOW_OK = re.compile(
    r"[ \t]*(?:$|\n|[^\w\s]|(?:confiden\w*|certain\w*|sure|and|or|but|because|since|as|so|given|based|on|for|with"
    r"|though|i)\b)"
)


def _normalize(text: str) -> str:
    """Full-width forms folded (NFKC: "８５％" -> "85%"), lower case, markdown emphasis
    dropped, spelled-out numbers before "percent" / around "out of" written as digits."""
    s = unicodedata.normalize("NFKC", str(text)).replace("\u066a", "%").lower()
    s = re.sub(r"[*_`#]", "", s)

    def digits(m):
        context_before = s[max(0, m.start() - 7):m.start()]
        if not (_WORD_CONTEXT_AFTER.match(s, m.end()) or re.search(r"out\s+of\s+$", context_before)):
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


@dataclass
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
        if rng is not None and rng.group("sep") == "and" and not re.search(r"between\s*$", s[:start]):
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
        clause_before = re.split(r"[.,;:!?\n()]", before)[-1]
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

    Reuses the benchmark rules of :mod:`csp_utils.world.benchmarks`:

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
    if family == "pope":
        return benchmarks.pope_parse(text)
    r = benchmarks.normalize_yes_no(text)
    return r.lower() if r is not None else None
