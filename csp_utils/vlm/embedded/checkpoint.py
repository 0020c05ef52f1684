"""Files of a pre-training run: resumable checkpoints (safetensors weights, optimizer and RNG
state, JSON progress), the parts of other trained models a run starts from, and the checksum
that tells a finished model folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from csp_utils.vlm import models
from csp_utils.vlm.embedded.build import build_processor
from csp_utils.vlm.embedded.config import INIT_PARTS, PretrainConfig

CHECKPOINT_DIR = "_checkpoint"
WARM_START_DIR = "_warm_start"
META_FILE = "csp_meta.json"
MODEL_FILE = "model.safetensors"


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].astype(np.int64).tolist(),
            "numpy_pos": int(np.random.get_state()[2])}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.asarray(state["numpy"], np.uint32), state["numpy_pos"]))


def save_checkpoint(folder: Path, model, heads, optimizer, state: dict) -> None:
    """Atomically replace ``folder`` with weights (safetensors), optimizer + RNG (torch.save), state (JSON)."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / MODEL_FILE))
    if heads is not None:
        save_file({k: v.detach().contiguous() for k, v in heads.state_dict().items()}, str(tmp / "heads.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_state()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint_state(folder: Path) -> dict | None:
    for f in (folder, folder.with_name(folder.name + ".old")):  # .old: a crash between the renames
        if (f / "state.json").exists() and (f / "optimizer.pt").exists():
            st = json.loads((f / "state.json").read_text())
            st["_folder"] = str(f)
            return st
    return None


def load_weights(module, path: Path) -> None:
    missing, unexpected = module.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not fit the model: missing {missing}, unexpected {unexpected}")


def load_optimizer(optimizer, folder: Path) -> None:
    blob = torch.load(Path(folder) / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    _set_rng_state(blob["rng"])


def resumed_processor(cfg: PretrainConfig, folder: Path):
    """The processor built in code, as a fresh run builds it, after checking that it is the
    one the checkpoint was trained with (a loaded one would save extra loader keys, so a
    resumed build would not write the files an uninterrupted one writes)."""
    processor = build_processor(cfg.model)
    saved = folder / "tokenizer.json"
    if saved.exists() and json.loads(saved.read_text()) != json.loads(processor.tokenizer.backend_tokenizer.to_str()):
        raise ValueError(f"the checkpoint's tokenizer ({saved}) is not the one this code builds; "
                         f"delete {folder.parent.parent} to train from scratch, or use the code that made it")
    return processor


def load_language(model, folder: Path) -> None:
    """Everything but the vision tower (language model, projector) from a trained model folder."""
    src, _ = models.load_vlm(folder, dtype=torch.float32)  # through transformers: its key layout
    weights = {k: v for k, v in src.state_dict().items() if ".vision_tower." not in k}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(".vision_tower." not in k for k in missing):
        raise RuntimeError(f"warm start {folder} does not fit the model: missing {missing}, unexpected {unexpected}")


def load_parts(model, folder, parts: Sequence[str]) -> dict:
    """Copy ``parts`` (INIT_PARTS) of the trained model in ``folder`` into ``model``; returns
    the source's identity for the meta."""
    src, _ = models.load_vlm(folder, dtype=torch.float32)
    prefixes = tuple(p for part in parts for p in INIT_PARTS[part])
    weights = {k: v for k, v in src.state_dict().items() if k.startswith(prefixes)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or not weights:
        raise RuntimeError(f"init_from {folder} does not fit the model: unexpected {unexpected}")
    path = Path(folder) / MODEL_FILE
    return {"path": str(folder), "parts": list(parts), "sha256": sha256_file(path), "tensors": len(weights)}


def refresh_unseen_tokens(model, fresh, seen_ids: np.ndarray) -> int:
    """Put the ``fresh`` embedding back on every token not in ``seen_ids``; returns how many."""
    unseen = np.setdiff1d(np.arange(fresh.shape[0]), np.unique(seen_ids))
    with torch.no_grad():
        model.get_input_embeddings().weight[torch.from_numpy(unseen)] = fresh[torch.from_numpy(unseen)]
    return int(len(unseen))


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_complete(folder, config: PretrainConfig | None = None) -> bool:
    """A finished model folder: weights whose sha256 matches csp_meta.json (and, if given, the same config)."""
    folder = Path(folder)
    meta_path, weights = folder / META_FILE, folder / MODEL_FILE
    if not (meta_path.exists() and weights.exists() and (folder / "config.json").exists()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return False
    if meta.get("sha256") != sha256_file(weights):
        return False
    return config is None or meta.get("config_fingerprint") == config.fingerprint()
