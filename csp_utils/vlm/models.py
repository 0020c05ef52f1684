"""Loading vision-language models: the embedded default by name, local folders and hub ids,
PEFT adapters checked against the base they were trained on (base fingerprints).

The embedded default is built and trained by ``csp_utils.vlm.embedded``; it is a real
transformers architecture, so every code path that serves ``llava-hf/llava-1.5-7b-hf``
serves it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
import weakref
from pathlib import Path
from csp_utils.core.paths import DATA

# --------------------------------------------------------------------------- loading

EMBEDDED = "embedded"  # the name that means "the project's own tiny default"
# Further bases that ship in the package (never built on demand), by name -> data folder.
SHIPPED_MODELS = {"embedded-noconf": "tiny_llava_noconf",   # trained without confidence turns
                  "embedded-deep": "tiny_llava_deep"}       # 6 language layers, no confidence turns


def shipped_model_path(name: str) -> Path:
    """The folder of a shipped base named in SHIPPED_MODELS."""
    path = DATA / SHIPPED_MODELS[name]
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{name!r} should ship at {path} but is missing; reinstall the package "
                                f"(its csp_meta.json records the command that trains it).")
    return path


def default_model_dir() -> Path:
    """Where the embedded default lives: shipped in the package, else the user cache."""
    shipped = DATA / "tiny_llava"
    if (shipped / "model.safetensors").exists():
        return shipped
    cache = Path(os.environ.get("CSP_CACHE", Path.home() / ".cache" / "csp_utils"))
    return cache / "tiny_llava"


class MissingEmbeddedModelError(FileNotFoundError):
    """The embedded default ships with the package; it is never retrained behind the caller's back."""


def missing_embedded_model_message() -> str:
    shipped = DATA / "tiny_llava"
    return (f"the embedded default model is missing: it ships at {shipped} (and is not in the cache "
            f"{default_model_dir()} either). Restore it with `git checkout -- csp_utils/data/tiny_llava` (or "
            "reinstall the package); to train a new one on purpose (about an hour on CPU): "
            "`python -m csp_utils.pretrain`")


def embedded_model_path() -> Path:
    """The embedded default's folder. Missing, it is an error saying how to restore it (it is
    trained only on purpose, by ``python -m csp_utils.pretrain``)."""
    path = default_model_dir()
    if (path / "model.safetensors").exists():
        return path
    raise MissingEmbeddedModelError(missing_embedded_model_message())


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither "embedded", an existing folder nor a reachable / cached hub id."""


class PartialWeightsError(ValueError):
    """A checkpoint that lacks weights of the model (or holds weights it does not have)."""


class AdapterBaseMismatchError(ValueError):
    """An adapter trained on another base model than the one it is put on."""


def _accepted_names() -> str:
    return (f'"{EMBEDDED}" (the project\'s tiny default), {", ".join(repr(n) for n in SHIPPED_MODELS)} (the shipped '
            "base without planted confidence), an existing folder written by save_pretrained (with "
            "config.json), or a Hugging Face hub id such as llava-hf/llava-1.5-7b-hf that is in the local cache "
            "(or downloadable while online)")


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_problem(repo_id: str, timeout: float = 5.0) -> str | None:
    """Why ``repo_id`` cannot come from the hub ("unreachable", "not found"), or None. One request
    with a short timeout and no retries: transformers' own retries take minutes to give up."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=timeout)
    except RepositoryNotFoundError:
        return "is not a model on the hub (or a private one this machine has no token for)"
    except HfHubHTTPError:
        return None  # gated, rate limited, ...: from_pretrained reports it in its own words
    except Exception as e:  # connection refused, DNS failure, timeout: the hub cannot be reached
        return f"cannot be looked up: the hub is unreachable ({type(e).__name__}: {e})"
    return None


def resolve_model_name(name_or_path) -> str:
    """The folder or hub id ``load_vlm`` loads, checked before anything is downloaded.

    Fails at once with :class:`ModelNotFoundError` (saying the local path does not exist and
    what is accepted) when the name is not an existing folder and either looks like a path
    (starts with ".", "~" or "/", or is not a valid hub id), or is a hub id that is not in the
    local cache while the hub is offline (``HF_HUB_OFFLINE``) or unreachable.
    """
    import difflib

    name = str(name_or_path)
    if name == EMBEDDED:
        return str(embedded_model_path())
    if name in SHIPPED_MODELS:
        return str(shipped_model_path(name))
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise FileNotFoundError(f"{local} has no config.json: not a transformers model folder.")
        return str(local)
    close = difflib.get_close_matches(name, [EMBEDDED, *SHIPPED_MODELS], n=1, cutoff=0.75)
    hint = f' Did you mean "{close[0]}"?' if close else ""
    head = f"{name!r}: the local path {local.resolve()} does not exist"
    looks_like_path = name.startswith((".", "~", "/", os.sep)) or local.is_absolute() or not _is_repo_id(name)
    if looks_like_path:
        raise ModelNotFoundError(f"{head}.{hint} Accepted: {_accepted_names()}.")
    if _in_hub_cache(name):
        return name
    if _hub_offline():
        raise ModelNotFoundError(f"{head}, and as a hub id it is not in the local Hugging Face cache while the hub is "
                                 f"offline (HF_HUB_OFFLINE).{hint} Accepted: {_accepted_names()}.")
    problem = _hub_problem(name)
    if problem is not None:
        raise ModelNotFoundError(f"{head}, and as a hub id it {problem}.{hint} Accepted: {_accepted_names()}.")
    return name


def _check_loading_info(info: dict, source: str, allow_partial: bool) -> None:
    """Refuse missing, unexpected or mismatched weights unless a partial load was asked for."""
    parts = []
    for key, what in (("missing_keys", "missing from the checkpoint (would be randomly initialised)"),
                      ("unexpected_keys", "in the checkpoint but not in the model (would be ignored)"),
                      ("mismatched_keys", "of another shape in the checkpoint")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in (info.get(key) or []))
        if names:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            parts.append(f"{len(names)} weight(s) {what}: {shown}")
    if not parts:
        return
    msg = f"{source}: " + "; ".join(parts)
    if not allow_partial:
        raise PartialWeightsError(f"{msg}. The checkpoint does not match the model: check that it was saved whole "
                                  "and from this architecture, or pass allow_partial=True to load it anyway.")
    warnings.warn(f"partial load (allow_partial=True) of {msg}", stacklevel=3)


# --------------------------------------------------------------------------- base fingerprints

BASE_RECORD = "csp_base.json"  # in an adapter folder: which base model it was trained on
CONFIG_FILE = "training_config.json"  # in an adapter folder: the training config (layout, target, ...)
# Confidence targets read from the base model's own answers: an adapter trained on one never
# learnt the answer turn, so the evaluation asks the answer of the base model.
GROUNDED_TARGETS = ("correct", "cell", "internal", "blend", "calibrated")
_FINGERPRINT_VALUES = 64


def base_fingerprint(model) -> str | None:
    """A cheap digest of a model's base weights, computed from the loaded model itself.

    sha256 over every tensor of the state dict, in name order: its name, shape and first
    64 values rounded to bfloat16. Any retraining changes the leading values of the tensors
    it touches, so another base with the same shapes gets another digest, while the cost
    stays at a few values per tensor (no pass over 7B weights). Rounding to bfloat16 makes a
    float32 and a bfloat16 load of one checkpoint agree. A PEFT model is digested as its base:
    adapter tensors are skipped and wrapped layers keep their original names. None when some
    weights are offloaded (on the meta device): their values are not in memory to digest.
    """
    import hashlib

    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    entries = {}
    for name, t in base.state_dict().items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        entries[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = t
    h = hashlib.sha256()
    with torch.no_grad():
        for name in sorted(entries):
            t = entries[name]
            if t.is_meta:
                return None
            h.update(f"{name}{tuple(t.shape)}".encode())
            head = t.detach().reshape(-1)[:_FINGERPRINT_VALUES]
            head = head.to(torch.bfloat16).float() if head.is_floating_point() else head.long()
            h.update(head.cpu().numpy().tobytes())
    return h.hexdigest()


def write_base_record(adapter_dir, model, base_name: str) -> Path:
    """Record in ``adapter_dir`` the base model the adapter was trained on (``csp_base.json``)."""
    path = Path(adapter_dir) / BASE_RECORD
    path.write_text(json.dumps({"base_model": str(base_name), "fingerprint": base_fingerprint(model),
                                "method": f"sha256 of name, shape, first {_FINGERPRINT_VALUES} values (bfloat16) "
                                          "of every base tensor"}, indent=2))
    return path


def check_adapter_base(model, adapter_dir, allow_base_mismatch: bool = False) -> None:
    """Refuse to put an adapter on another base than the one recorded in its folder.

    An adapter folder without the record (made elsewhere) loads with a warning; a mismatch
    raises :class:`AdapterBaseMismatchError` unless ``allow_base_mismatch`` (then a warning).
    """
    path = Path(adapter_dir) / BASE_RECORD
    if not path.exists():
        warnings.warn(f"adapter {adapter_dir} records no base model ({BASE_RECORD}): it cannot be checked against "
                      "the base it is put on; make sure it was trained on this one", stacklevel=3)
        return
    record = json.loads(path.read_text())
    recorded, now = record.get("fingerprint"), base_fingerprint(model)
    if recorded is None or now is None:
        warnings.warn(f"adapter {adapter_dir}: the base model's weights are offloaded (meta device) at "
                      f"{'training' if recorded is None else 'loading'}, so the base cannot be checked against "
                      f"{record.get('base_model')!r}", stacklevel=3)
        return
    if recorded == now:
        return
    base_now = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    msg = (f"adapter {adapter_dir} was trained on base model {record.get('base_model')!r} (fingerprint "
           f"{recorded[:12]}...), but the base it is put on ({base_now}) has other weights (fingerprint {now[:12]}...)")
    if not allow_base_mismatch:
        raise AdapterBaseMismatchError(f"{msg}. Load the base it was trained on, or pass allow_base_mismatch=True "
                                       "to put it on this one anyway.")
    warnings.warn(f"{msg}; loaded anyway (allow_base_mismatch=True)", stacklevel=3)


def load_vlm(
    name_or_path: str | os.PathLike = EMBEDDED,
    *,
    adapter: str | os.PathLike | None = None,
    dtype="auto",
    device: str | None = None,
    device_map=None,
    trust_remote_code: bool = False,
    merge_adapter: bool = False,
    allow_partial: bool = False,
    allow_base_mismatch: bool = False,
):
    """Load a VLM and its processor from the embedded default, a local folder or a hub id.

    ``adapter`` names a PEFT adapter folder to put on top. Weights load from safetensors only,
    and remote code runs only when ``trust_remote_code=True`` is asked for.

    Checked before and while loading: a name that is neither "embedded", an existing folder
    nor a cached (or, online, existing) hub id fails at once (:func:`resolve_model_name`); a
    checkpoint with missing, unexpected or mis-shaped weights is refused unless
    ``allow_partial=True``; an adapter whose folder records another base model
    (``csp_base.json``, :func:`base_fingerprint`) is refused unless ``allow_base_mismatch=True``.
    """
    name_or_path = resolve_model_name(name_or_path)  # before importing transformers: a bad name fails in ms
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model, info = AutoModelForImageTextToText.from_pretrained(
        name_or_path,
        dtype=dtype,
        device_map=device_map,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
    )
    _check_loading_info(info, str(name_or_path), allow_partial)
    if device is not None and device_map is None:
        model = model.to(device)
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    if adapter is not None:
        from peft import PeftModel

        check_adapter_base(model, adapter, allow_base_mismatch)
        model = PeftModel.from_pretrained(model, adapter)
        if merge_adapter:
            model = model.merge_and_unload()
    model.eval()
    return model, processor


def add_adapter(model, adapter: str | os.PathLike, name: str, allow_base_mismatch: bool = False):
    """Another PEFT adapter on a model loaded with one (:func:`load_vlm`), under ``name``, checked
    against the base like the first; ``model.set_adapter(name)`` makes it the active one."""
    check_adapter_base(model, adapter, allow_base_mismatch)
    model.load_adapter(str(adapter), adapter_name=name)
    model.eval()
    return model


_TUNER_LAYERS = weakref.WeakKeyDictionary()   # PEFT model -> (its adapters' configs, its tuner layers)


def _tuner_layers(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    key = tuple((name, id(config)) for name, config in model.peft_config.items())   # an adapter loaded again is new
    known = _TUNER_LAYERS.get(model)
    if known is None or known[0] != key:
        known = key, [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
        _TUNER_LAYERS[model] = known
    return known[1]


@contextlib.contextmanager
def adapters_disabled(model):
    """``model.disable_adapter()`` for a PEFT LoRA model, switching the same layers with PEFT's
    own ``enable_adapters``, without the survey of every layer's status that PEFT makes on
    each call (``get_model_status``: about 6% of an activated training step on the embedded
    deep base). The layers are found once per set of adapters. Other adapter
    kinds, and a model whose layers are not all enabled, take PEFT's own context."""
    configs = getattr(model, "peft_config", None) or {}
    layers = _tuner_layers(model) if configs and not any(
        c.is_prompt_learning or c.is_adaption_prompt for c in configs.values()) else []
    if not layers or model._adapters_disabled or any(layer.disable_adapters for layer in layers):
        with model.disable_adapter():
            yield
        return
    model._adapters_disabled = True
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        model._adapters_disabled = False


def save_vlm(model, processor, folder: str | os.PathLike, meta: dict | None = None) -> Path:
    """Save as a normal transformers folder (safetensors + processor) plus ``csp_meta.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    if meta is not None:
        (folder / "csp_meta.json").write_text(json.dumps(meta, indent=2, default=str))
    return folder
