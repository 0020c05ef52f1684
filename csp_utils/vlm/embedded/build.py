"""The embedded LLaVA built from scratch: its shape, its tokenizer trained in code, its processor.

A real transformers architecture (``LlavaForConditionalGeneration``: a CLIP vision tower + a
Llama text model) with a byte-level BPE tokenizer, so every code path that serves
``llava-hf/llava-1.5-7b-hf`` serves it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

from csp_utils.vlm import prompts
from csp_utils.world import catalog


# One chat template for the tiny model. Assistant text sits inside {% generation %} so that
# trl's assistant-only loss masks everything else; the leading space keeps the prompt
# ("... ASSISTANT:") a token-exact prefix of the full conversation.
# A user turn puts its text before its image ("USER: Is there a star? <image>"): with causal
# attention the image tokens can then read the question (as instruction-aware adapters such
# as InstructBLIP's do). In our pre-training probes no image-first run left chance-level
# yes/no accuracy within 2000 joint steps; text-first with the existence phase of pre-training did.
def tiny_chat_template(image_first: bool = False) -> str:
    """The tiny model's chat template; ``image_first`` gives LLaVA-1.5's layout instead."""
    text = "{% for c in message['content'] %}{% if c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}"
    image = "{% for c in message['content'] %}{% if c['type'] == 'image' %} <image>{% endif %}{% endfor %}"
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}USER:"
        "{% if message['content'] is string %} {{ message['content'] }}"
        "{% else %}" + (image + text if image_first else text + image) + "{% endif %}{{ '\\n' }}"
        "{% elif message['role'] == 'assistant' %}ASSISTANT:{% generation %}"
        "{% if message['content'] is string %} {{ message['content'] }}"
        "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{{ eos_token }}{% endgeneration %}{{ '\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]


@dataclass
class TinyVLMConfig:
    """Shape of the embedded LLaVA. Defaults: the smallest shape that learned the object world in CPU minutes."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 256
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    text_intermediate: int = 128
    vocab_size: int = 640          # BPE target size; the trained vocabulary may be smaller
    image_first: bool = False      # chat layout "USER: <image> text" (LLaVA-1.5's); default text first
    max_position_embeddings: int = 256
    seed: int = 0


def _tokenizer_corpus() -> list[str]:
    """Text the BPE is trained on: the world's vocabulary, prompts and confidence replies."""
    words = list(catalog.CATEGORIES) + list(catalog.COLORS) + list(catalog.SIZES)
    lines = [" ".join(words)] * 20
    lines += prompts.corpus_lines()
    lines += [f"{c}%" for c in range(101)] * 5 + [f"{c} %" for c in range(0, 101, 10)]
    lines += ["Yes", "No", "yes", "no", "0.85", "percent", "Confidence:", "I am sure"]
    return lines


def build_tokenizer(vocab_size: int = 640, image_first: bool = False):
    """A byte-level BPE tokenizer trained in code; handles any text (bytes fall back)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",  # decoder-only batches generate from the right edge
    )
    fast.chat_template = tiny_chat_template(image_first)
    return fast


def build_processor(cfg: TinyVLMConfig | None = None, tokenizer=None):
    cfg = cfg or TinyVLMConfig()
    tokenizer = tokenizer or build_tokenizer(cfg.vocab_size, cfg.image_first)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=[0.5, 0.5, 0.5],  # pixels in [-1, 1], the range CSP noise works in
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tiny_chat_template(cfg.image_first),
    )


def build_tiny_vlm(cfg: TinyVLMConfig | None = None, processor=None):
    """A randomly initialised tiny LLaVA and its processor, deterministic under ``cfg.seed``."""
    cfg = cfg or TinyVLMConfig()
    processor = processor or build_processor(cfg)
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        intermediate_size=cfg.vision_intermediate,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        intermediate_size=cfg.text_intermediate,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.eval()
    return model, processor
