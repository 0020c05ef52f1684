"""The loader's real path without downloads: tiny random models of every supported
architecture, with tokenizers made in code, saved with ``save_pretrained``, loaded back by
``models.load_vlm(path)`` and run through elicitation end to end.
"""

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from csp_utils.evaluate import evaluation as ev
from csp_utils.vlm import engine, scoring, models, prompts
from csp_utils.vlm.embedded import build
from csp_utils.world.benchmarks import Benchmark
from csp_utils.world.schema import QAItem

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ shared helpers
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=512)


def bpe_tokenizer(special_tokens, **kwargs):
    """A byte-level BPE trained in code on the project's prompt corpus, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(tok_models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(build._tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, padding_side="left", **kwargs)


def benchmark(n=4, family="amber"):
    rng = np.random.default_rng(1)
    images = {f"im{i}": Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 52, 3), dtype=np.uint8)) for i in range(2)}
    questions = ["Is there a cat in this image?", "Is the small red square left of the large blue star in this image?"]
    items = [QAItem(f"q{i}", f"im{i % 2}", questions[i % 2], "yes" if i % 2 else "no", f"{family}-t", "existence", [])
             for i in range(n)]
    return Benchmark(f"{family}-t", family, items, lambda k: images[k], "no" if family == "amber" else "yes")


def assert_saved_as_safetensors(folder):
    names = {p.name for p in folder.iterdir()}
    assert any(n.endswith(".safetensors") for n in names), names
    assert not any(n.endswith(".bin") or n.endswith(".pt") for n in names), names


def elicit_end_to_end(model, processor, tmp_path, name, shares_prefix=True):
    """evaluate() on a small benchmark, both read-outs; the cached option scores equal the
    one-question-one-option reference on the same confidence prompts."""
    bench = benchmark()
    answer_msgs = [prompts.answer_messages(it.question) for it in bench.items]
    prefix, _ = engine.shared_prefix(model, processor, answer_msgs, [bench.image_loader(it.image_id) for it in bench.items])
    assert (prefix is not None) == shares_prefix, "the template head + image is reused where that is exact"
    cfg = ev.EvalConfig(framings=("third", "first"), batch_size=4, max_new_tokens=4, confidence_max_new_tokens=4,
                        options=(0, 25, 50, 75, 100), progress=False)
    rows = ev.load_results(ev.evaluate(model, processor, bench, tmp_path / f"{name}.jsonl", name, cfg))
    assert len(rows) == len(bench.items) * 4
    single = [r for r in rows if r["readout"] == "single_pass"]
    for r in single:
        assert sum(r["option_probs"]) == pytest.approx(1.0) and 0 <= r["confidence"] <= 1
    # reference on the first framing's prompts, built from the answers the run recorded
    third = [r for r in single if r["framing"] == "third"]
    msgs = [prompts.confidence_messages(r["question"], r["response"], framing="third") for r in third]
    images = [bench.image_loader(r["image_id"]) for r in third]
    ids = engine.option_token_ids(processor, cfg.options)
    ref = scoring.score_options_reference(model, processor, msgs, images, ids)
    np.testing.assert_allclose([r["option_logliks"] for r in third], ref, atol=1e-4, rtol=0)
    summary = ev.summarize(rows, bench.positive_class)
    assert {s["readout"] for s in summary} == {"generated", "single_pass"}
    return rows


# ----------------------------------------------------------------- our tiny LLaVA
def test_embedded_tiny_llava_round_trip(tiny_vlm, tmp_path):
    model, proc = tiny_vlm
    folder = models.save_vlm(model, proc, tmp_path / "tiny", meta={"seed": 0})
    assert_saved_as_safetensors(folder)
    loaded, lproc = models.load_vlm(folder)
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    assert lproc.tokenizer.padding_side == "left"
    for name, p in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], p, rtol=0, atol=0)
    # text first, then the image: no head is shared, every prompt runs whole
    elicit_end_to_end(loaded, lproc, tmp_path, "tiny", shares_prefix=False)


# ------------------------------------------------------- LLaVA built like llava-1.5
# The template of llava-hf/llava-1.5-*-hf: "USER: <image>\n{text} ASSISTANT:"
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def llama_tokenizer():
    """A Llama-style tokenizer (Metaspace "▁", byte fallback) from a BPE trained in code."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import LlamaTokenizer

    bpe = Tokenizer(tok_models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]  # Llama's byte tokens
    bpe.train_from_iterator(build._tokenizer_corpus(),
                            trainer=trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False))
    data = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["merges"]]
    tok = LlamaTokenizer(vocab=data["vocab"], merges=merges)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.padding_side = "left"
    return tok


def build_llava15_like(folder):
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = llama_tokenizer()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA15_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, **TINY_TEXT),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,  # llava-1.5 reads the penultimate CLIP layer
        image_seq_length=16,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


def test_llava15_like_round_trip(tmp_path):
    build_llava15_like(tmp_path / "llava15")
    assert_saved_as_safetensors(tmp_path / "llava15")
    model, proc = models.load_vlm(tmp_path / "llava15")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    text = proc.apply_chat_template(prompts.answer_messages("Is there a cat?"), add_generation_prompt=True)
    assert text == "USER: <image>\nIs there a cat? Answer with Yes or No. ASSISTANT:"
    # the reply as the template writes it: "ASSISTANT: 85% " -> the option is "85%", then EOS
    tok = proc.tokenizer
    ids = engine.reply_tokens(proc, "85%", include_end=True)
    assert tok.decode(ids[:-1]).strip() == "85%" and ids[-1] == tok.eos_token_id
    elicit_end_to_end(model, proc, tmp_path, "llava15")


# --------------------------------------------------------------- Idefics3 / SmolVLM
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_idefics3(folder):
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                              Idefics3Processor, Idefics3VisionConfig, LlamaConfig)

    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = bpe_tokenizer(specials, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    # no splitting, one 32 px tile: (32 / 8)^2 patches / scale_factor^2 = 4 image tokens
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                                max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                  chat_template=SMOLVLM_TEMPLATE)
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, **TINY_TEXT),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


def test_idefics3_round_trip(tmp_path):
    build_idefics3(tmp_path / "idefics3")
    assert_saved_as_safetensors(tmp_path / "idefics3")
    model, proc = models.load_vlm(tmp_path / "idefics3")
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert type(proc.image_processor).__name__ == "Idefics3ImageProcessorPil"  # no torchvision needed
    ids = engine.reply_tokens(proc, "85%", include_end=True)
    assert proc.tokenizer.convert_ids_to_tokens(ids[-1]) == "<end_of_utterance>"  # the template's end of turn
    elicit_end_to_end(model, proc, tmp_path, "idefics3")

    # SmolVLM splits large images into tiles: the image token count then differs between
    # rows, the prefix cannot be shared, and the whole-prompt path must still be exact
    from transformers import Idefics3ImageProcessorPil

    proc.image_processor = Idefics3ImageProcessorPil(do_image_splitting=True, size={"longest_edge": 64},
                                                     max_image_size={"longest_edge": 32})
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, s, dtype=np.uint8)) for s in [(30, 60, 3), (60, 60, 3), (60, 20, 3)]]
    questions = ["Is there a cat?", "Is the big red square left of the star?", "Is there?"]
    prefix, plain = engine.shared_prefix(model, proc, [prompts.answer_messages(q) for q in questions], images)
    assert prefix is None and len(set(plain.attention_mask.sum(1).tolist())) == 3
    msgs = [prompts.confidence_messages(q, a) for q, a in zip(questions, ["Yes", "No", "Maybe"])]
    ids = engine.option_token_ids(proc, [0, 50, 100])
    np.testing.assert_allclose(scoring.score_options(model, proc, msgs, images, ids),
                               scoring.score_options_reference(model, proc, msgs, images, ids), atol=1e-4, rtol=0)
    assert engine.generate_replies(model, proc, msgs, images, 4)[0] == \
        [engine.generate_replies(model, proc, [m], [im], 4)[0][0] for m, im in zip(msgs, images)]


# --------------------------------------------------------------------------- Qwen2-VL
QWEN2VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _torchvision_problem() -> str | None:
    """Why Qwen2-VL cannot run here, or None. A CUDA torchvision beside a CPU torch is
    installed yet fails at import, so importing is the test, not finding the package."""
    if importlib.util.find_spec("torchvision") is None:
        return ("torchvision is not installed: Qwen2-VL's processor needs it (its video processor); "
                "torchvision belongs to the GPU extra (pip install csp_utils[gpu]) and is kept out of the CPU env")
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # e.g. "operator torchvision::nms does not exist"
        return f"torchvision is installed but does not import ({type(e).__name__}: {e}); Qwen2-VL needs it"
    return None


@pytest.mark.skipif(_torchvision_problem() is not None, reason=str(_torchvision_problem()))
def test_qwen2_vl_round_trip(tmp_path):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = bpe_tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                              "vision_start_token": "<|vision_start|>",
                                              "vision_end_token": "<|vision_end|>"})
    sizes = dict(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(**sizes), tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN2VL_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                         **TINY_TEXT),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(tmp_path / "qwen2vl")
    processor.save_pretrained(tmp_path / "qwen2vl")
    assert_saved_as_safetensors(tmp_path / "qwen2vl")
    model, proc = models.load_vlm(tmp_path / "qwen2vl")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    # multimodal RoPE: no shared prefix, options through the exact (uncached) path
    elicit_end_to_end(model, proc, tmp_path, "qwen2vl", shares_prefix=False)


# ------------------------------------------------------------------------ adapters
def test_adapter_folder(tiny_vlm, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, proc = tiny_vlm
    base_dir = models.save_vlm(model, proc, tmp_path / "base")
    base, _ = models.load_vlm(base_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, lora).eval()  # random B: the adapter changes the outputs
    peft_model.save_pretrained(tmp_path / "adapter")
    assert_saved_as_safetensors(tmp_path / "adapter")

    loaded, lproc = models.load_vlm(base_dir, adapter=tmp_path / "adapter")
    assert isinstance(loaded, PeftModel)
    bench = benchmark(2)
    images = [bench.image_loader(it.image_id) for it in bench.items]
    enc = engine.encode(lproc, [prompts.answer_messages(it.question) for it in bench.items], images)
    plain, _ = models.load_vlm(base_dir)
    with torch.no_grad():
        a, b, c = (m(**enc).logits for m in (loaded, peft_model, plain))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3, "the adapter did not change the model"
    elicit_end_to_end(loaded, lproc, tmp_path, "tiny+lora", shares_prefix=False)

    merged, _ = models.load_vlm(base_dir, adapter=tmp_path / "adapter", merge_adapter=True)
    assert not isinstance(merged, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, a, atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------- safety
def test_loader_asks_for_safetensors_and_no_remote_code(tiny_vlm, tmp_path, monkeypatch):
    import inspect

    import transformers

    assert inspect.signature(models.load_vlm).parameters["trust_remote_code"].default is False
    seen = {}
    for cls in (transformers.AutoModelForImageTextToText, transformers.AutoProcessor):
        original = cls.from_pretrained

        def spy(*args, _original=original, _name=cls.__name__, **kwargs):
            seen[_name] = kwargs
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    folder = models.save_vlm(*tiny_vlm, tmp_path / "tiny")
    models.load_vlm(folder)
    assert seen["AutoModelForImageTextToText"]["use_safetensors"] is True
    assert seen["AutoModelForImageTextToText"]["trust_remote_code"] is False
    assert seen["AutoProcessor"]["trust_remote_code"] is False


def test_loader_refuses_pickled_weights(tiny_vlm, tmp_path):
    model, proc = tiny_vlm
    folder = tmp_path / "pickled"
    folder.mkdir()
    model.config.save_pretrained(folder)
    proc.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(Exception, match="safetensors|model.safetensors"):
        models.load_vlm(folder)


def test_loader_explains_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load_vlm(tmp_path)


# ------------------------------------------------------------------ names, weights, bases
@pytest.mark.timeout(60)  # transformers' own retries took minutes to give up
@pytest.mark.parametrize("name", ["embeded", "./models/tiny", "~/no/such/model", "/no/such/abs/model", "org/not-cached"])
def test_a_name_that_is_no_folder_and_not_cached_fails_at_once_offline(name):
    with pytest.raises(models.ModelNotFoundError) as e:
        models.load_vlm(name)
    msg = str(e.value)
    assert "does not exist" in msg and '"embedded"' in msg and "existing folder" in msg and "cache" in msg
    assert "Repo id must be" not in msg
    if name == "embeded":
        assert 'Did you mean "embedded"' in msg


@pytest.mark.timeout(60)
def test_a_name_that_is_no_folder_fails_at_once_when_the_hub_is_unreachable(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    with pytest.raises(models.ModelNotFoundError, match="does not exist.*unreachable"):
        models.load_vlm("embeded")


def test_a_hub_id_in_the_local_cache_is_accepted(monkeypatch, tmp_path):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--org--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert models.resolve_model_name("org/tiny") == "org/tiny"
    with pytest.raises(models.ModelNotFoundError):
        models.resolve_model_name("org/other")


def _edit_weights(folder, drop=None, add=None):
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    if drop:
        key = next(k for k in tensors if drop in k)
        del tensors[key]
    if add:
        tensors[add] = torch.zeros(3)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_or_unexpected_weights_are_refused_unless_a_partial_load_is_asked(tiny_vlm, tmp_path):
    model, proc = tiny_vlm
    missing = models.save_vlm(model, proc, tmp_path / "missing")
    _edit_weights(missing, drop="layers.0.self_attn.q_proj.weight")
    with pytest.raises(models.PartialWeightsError, match=r"1 weight\(s\) missing.*layers\.0\.self_attn\.q_proj\.weight"):
        models.load_vlm(missing)
    with pytest.warns(UserWarning, match="partial load.*q_proj"):
        loaded, _ = models.load_vlm(missing, allow_partial=True)
    assert loaded is not None
    extra = models.save_vlm(model, proc, tmp_path / "extra")
    _edit_weights(extra, add="stray.weight")
    with pytest.raises(models.PartialWeightsError, match="not in the model.*stray.weight"):
        models.load_vlm(extra)
    models.load_vlm(models.save_vlm(model, proc, tmp_path / "whole"))  # a whole checkpoint loads as before


@pytest.fixture(scope="module")
def two_bases(tiny_vlm, tmp_path_factory):
    """Two saved bases with the same shapes and other weights, and a LoRA adapter made on the first."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("bases")
    model, proc = tiny_vlm
    a = models.save_vlm(model, proc, root / "a")
    other, _ = build.build_tiny_vlm(build.TinyVLMConfig(seed=1), processor=proc)
    b = models.save_vlm(other, proc, root / "b")
    base, _ = models.load_vlm(a)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(root / "adapter")
    models.write_base_record(root / "adapter", peft_model, str(a))
    return a, b, root / "adapter"


def test_the_base_fingerprint_ignores_adapters_and_dtype_but_not_weights(two_bases):
    from peft import PeftModel

    a, b, adapter = two_bases
    fp = models.base_fingerprint(models.load_vlm(a)[0])
    assert json.loads((adapter / models.BASE_RECORD).read_text())["fingerprint"] == fp  # made on the PEFT model
    assert models.base_fingerprint(PeftModel.from_pretrained(models.load_vlm(a)[0], adapter)) == fp
    assert models.base_fingerprint(models.load_vlm(a, dtype=torch.bfloat16)[0]) == fp
    assert models.base_fingerprint(models.load_vlm(b)[0]) != fp


def test_an_adapter_is_refused_on_another_base_unless_overridden(two_bases, tmp_path, recwarn):
    import shutil

    from peft import PeftModel

    a, b, adapter = two_bases
    loaded, _ = models.load_vlm(a, adapter=adapter)  # its own base: no warning
    assert isinstance(loaded, PeftModel)
    assert not [w for w in recwarn if models.BASE_RECORD in str(w.message) or "fingerprint" in str(w.message)]
    with pytest.raises(models.AdapterBaseMismatchError, match=f"trained on base model '{a}'.*allow_base_mismatch"):
        models.load_vlm(b, adapter=adapter)
    with pytest.warns(UserWarning, match="allow_base_mismatch=True"):
        loaded, _ = models.load_vlm(b, adapter=adapter, allow_base_mismatch=True)
    assert isinstance(loaded, PeftModel)
    foreign = shutil.copytree(adapter, tmp_path / "foreign")  # an adapter made elsewhere: no record
    (foreign / models.BASE_RECORD).unlink()
    with pytest.warns(UserWarning, match="records no base model"):
        loaded, _ = models.load_vlm(b, adapter=foreign)
    assert isinstance(loaded, PeftModel)


def test_an_offloaded_base_is_not_fingerprinted_and_the_check_warns(two_bases, monkeypatch):
    a, _, adapter = two_bases
    model = models.load_vlm(a)[0]
    with torch.device("meta"):
        meta = torch.empty(3)
    state = dict(model.state_dict())
    state[next(iter(state))] = meta
    monkeypatch.setattr(model, "state_dict", lambda: state)
    assert models.base_fingerprint(model) is None
    with pytest.warns(UserWarning, match="offloaded"):
        models.check_adapter_base(model, adapter)
