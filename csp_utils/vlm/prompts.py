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
  closed: :func:`csp_utils.vlm.engine.chat_texts`). Framing does not apply.
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
