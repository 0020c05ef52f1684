"""Vision-language models: the embedded tiny LLaVA and the loader for real checkpoints.

The embedded default is a real transformers architecture (``LlavaForConditionalGeneration``:
a CLIP vision tower + a Llama text model) with a byte-level BPE tokenizer trained in code,
so every code path that serves ``llava-hf/llava-1.5-7b-hf`` serves it too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

# One chat template for the tiny model. Assistant text sits inside {% generation %} so that
# trl's assistant-only loss masks everything else; the leading space keeps the prompt
# ("... ASSISTANT:") a token-exact prefix of the full conversation.
# A user turn puts its text before its image ("USER: Is there a star? <image>"): with causal
# attention the image tokens can then read the question (as instruction-aware adapters such
# as InstructBLIP's do). In our pre-training probes no image-first run left chance-level
# yes/no accuracy within 2000 joint steps; text-first with pretrain's existence phase did.
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
    """Shape of the embedded LLaVA. Defaults follow the probe in shared/notes/stack.md."""

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
    from csp_utils import prompts

    words = []
    try:
        from csp_utils import scenes

        words += list(scenes.CATEGORIES) + list(scenes.COLORS) + list(scenes.SIZES)
    except (ImportError, AttributeError):  # the world module may not exist yet in isolation
        pass
    lines = [" ".join(words)] * 20
    lines += prompts.corpus_lines()
    lines += [f"{c}%" for c in range(101)] * 5 + [f"{c} %" for c in range(0, 101, 10)]
    lines += ["Yes", "No", "yes", "no", "0.85", "percent", "Confidence:", "I am sure"]
    return lines


def build_tokenizer(vocab_size: int = 640, image_first: bool = False):
    """A byte-level BPE tokenizer trained in code; handles any text (bytes fall back)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    from transformers import CLIPImageProcessorPil, LlavaProcessor

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
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

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


# --------------------------------------------------------------------------- loading

EMBEDDED = "embedded"  # the name that means "the project's own tiny default"
# Further bases that ship in the package (never built on demand), by name -> data folder.
SHIPPED_MODELS = {"embedded-noconf": "tiny_llava_noconf"}   # trained without confidence turns


def shipped_model_path(name: str) -> Path:
    """The folder of a shipped base named in SHIPPED_MODELS."""
    path = Path(__file__).parent / "data" / SHIPPED_MODELS[name]
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{name!r} should ship at {path} but is missing; reinstall the package "
                                f"(its csp_meta.json records the command that trains it).")
    return path


def default_model_dir() -> Path:
    """Where the embedded default lives: shipped in the package, else the user cache."""
    shipped = Path(__file__).parent / "data" / "tiny_llava"
    if (shipped / "model.safetensors").exists():
        return shipped
    cache = Path(os.environ.get("CSP_CACHE", Path.home() / ".cache" / "csp_utils"))
    return cache / "tiny_llava"


def embedded_model_path(build: bool = True) -> Path:
    """The embedded default's folder; trained (resumably, deterministically) when absent."""
    path = default_model_dir()
    if (path / "model.safetensors").exists():
        return path
    if not build:
        raise FileNotFoundError(f"The embedded default model is not at {path}. Build it with "
                                "`python -m csp_utils.pretrain`, or pass a Hugging Face id / local folder.")
    from csp_utils import pretrain

    print(f"The embedded default model is not at {path}: training it now (python -m csp_utils.pretrain; "
          "resumes if interrupted).", flush=True)
    return pretrain.build_default_model(path)


def load_vlm(
    name_or_path: str | os.PathLike = EMBEDDED,
    *,
    adapter: str | os.PathLike | None = None,
    dtype="auto",
    device: str | None = None,
    device_map=None,
    trust_remote_code: bool = False,
    merge_adapter: bool = False,
):
    """Load a VLM and its processor from the embedded default, a local folder or a hub id.

    ``adapter`` names a PEFT adapter folder to put on top. Weights load from safetensors only,
    and remote code runs only when ``trust_remote_code=True`` is asked for.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if str(name_or_path) == EMBEDDED:
        name_or_path = embedded_model_path()
    elif str(name_or_path) in SHIPPED_MODELS:
        name_or_path = shipped_model_path(str(name_or_path))
    local = Path(name_or_path)
    if local.exists() and not (local / "config.json").exists():
        raise FileNotFoundError(f"{local} has no config.json: not a transformers model folder.")

    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(
        name_or_path,
        dtype=dtype,
        device_map=device_map,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    if device is not None and device_map is None:
        model = model.to(device)
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if merge_adapter:
            model = model.merge_and_unload()
    model.eval()
    return model, processor


def save_vlm(model, processor, folder: str | os.PathLike, meta: dict | None = None) -> Path:
    """Save as a normal transformers folder (safetensors + processor) plus ``csp_meta.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    if meta is not None:
        (folder / "csp_meta.json").write_text(json.dumps(meta, indent=2, default=str))
    return folder


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
