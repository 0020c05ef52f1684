"""The pre-training command line (``python -m csp_utils.pretrain``).

The command-line overrides apply to the last round; the first is built (or reused) as
configured in ``warm_start``, under ``DIR/_warm_start`` (removed when the model is done).
``--init-from DIR --init-parts ...`` starts from parts of a finished model instead (no
``warm_start``), ``--set FIELD=JSON`` sets any other field; docs/base_models.md shows the
command that built the base without confidence turns.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from csp_utils.vlm.embedded.checkpoint import META_FILE
from csp_utils.vlm.embedded.config import INIT_PARTS, PretrainConfig
from csp_utils.vlm.embedded.train import build_default_model

PROG = "python -m csp_utils.pretrain"
DESCRIPTION = "Training the embedded default VLM from scratch on the object world (CPU, minutes)."


def parse_sets(items: Sequence[str]) -> dict:
    """``FIELD=JSON`` overrides of PretrainConfig fields (scalars and lists)."""
    names = {f.name for f in dataclasses.fields(PretrainConfig)} - {"model", "world", "warm_start"}
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--set {item!r}: expected FIELD=JSON with FIELD one of {sorted(names)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"--set {item!r}: the value is not JSON ({e}); quote strings as '\"text\"'") from None
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def parse_command(argv: Sequence[str]):
    """``(args, config)`` of a command line (the arguments after ``PROG``)."""
    ap = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    ap.add_argument("--out", default=None, help="model folder (default: models.default_model_dir())")
    ap.add_argument("--steps", type=int, default=None, help="joint-stage step budget")
    ap.add_argument("--vision-steps", type=int, default=None)
    ap.add_argument("--max-steps", type=int, default=None, help="cap of the joint stage with gate extensions")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--overconfident-fraction", type=float, default=None)
    ap.add_argument("--gate", type=float, default=None, help="accuracy gate (<= 0 disables)")
    ap.add_argument("--init-from", default=None, help="start from parts of this trained model folder (no warm_start)")
    ap.add_argument("--init-parts", default=None, help=f"comma-separated, of {','.join(INIT_PARTS)}")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="any PretrainConfig field, value as JSON (e.g. --set lr=0.002)")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (learns nothing)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="retrain even if a complete model exists")
    ap.add_argument("--text-layers", type=int, default=None,
                    help="language layers (a shallower --init-from fills the bottom ones; the rest start fresh)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    cfg = PretrainConfig.tiny(progress=True) if args.tiny else PretrainConfig()
    over = {"joint_steps": args.steps, "vision_steps": args.vision_steps, "seed": args.seed,
            "overconfident_fraction": args.overconfident_fraction, "num_threads": args.threads,
            "max_joint_steps": args.max_steps}
    over = {k: v for k, v in over.items() if v is not None}
    if args.gate is not None:
        over["gate_accuracy"] = args.gate if args.gate > 0 else None
    if args.no_progress:
        over["progress"] = False
    if args.init_from is not None:
        over.update(init_from=args.init_from, warm_start=None,
                    init_parts=tuple(p for p in (args.init_parts or "").split(",") if p))
    over.update(parse_sets(args.set))
    if args.text_layers is not None:
        if args.text_layers < 1:
            raise ValueError(f"--text-layers {args.text_layers}: a language model needs at least one layer")
        over["model"] = dataclasses.replace(cfg.model, text_layers=args.text_layers)
    cfg = dataclasses.replace(cfg, **over)
    if cfg.max_joint_steps < cfg.joint_steps:
        cfg = dataclasses.replace(cfg, max_joint_steps=cfg.joint_steps)
    return args, cfg


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, cfg = parse_command(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    command = PROG + " " + " ".join(argv)
    path = build_default_model(args.out, cfg, force=args.force, command=command.strip())
    meta = json.loads((Path(path) / META_FILE).read_text())
    print(json.dumps({"path": str(path), "sha256": meta["sha256"], "eval": meta["eval"]}, indent=2))
    return 0
