"""Prompt templates and chat messages for answers and verbalized confidence.

The confidence question is one user turn that carries the image. Third person is the
paper's wording and the default; first person is kept for the comparison.
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
FRAMINGS = ("third", "first")
CONFIDENCE_LEVELS = tuple(range(0, 101, 10))  # integer percents


@dataclass
class PromptConfig:
    answer_template: str = ANSWER_TEMPLATE
    third_person_template: str = THIRD_PERSON_TEMPLATE
    first_person_template: str = FIRST_PERSON_TEMPLATE

    def confidence_template(self, framing: str) -> str:
        if framing == "third":
            return self.third_person_template
        if framing == "first":
            return self.first_person_template
        raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")


def answer_text(query: str, config: PromptConfig | None = None) -> str:
    return (config or PromptConfig()).answer_template.format(query=query)


def confidence_text(query: str, response: str, framing: str = "third", config: PromptConfig | None = None) -> str:
    return (config or PromptConfig()).confidence_template(framing).format(query=query, response=response)


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
    query: str, response: str, confidence: str | None = None, framing: str = "third", config: PromptConfig | None = None
) -> list[dict]:
    msgs = [user_turn(confidence_text(query, response, framing, config))]
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
