"""Where the base model's world-POPE errors are: accuracy by gold answer, by the size of the
asked object (visible pixels of its largest instance, "yes" questions), by shape and answer.

    python scripts/base_model_errors.py [--model embedded|PATH] [--scenes 300]

Eval-split scenes, the same POPE sets as the model's own report (``csp_meta.json``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

AREA_BINS = ((60, "<60 px"), (120, "60-119 px"), (250, "120-249 px"), (None, ">=250 px"))


def area_bin(pixels: int) -> str:
    return next(name for top, name in AREA_BINS if top is None or pixels < top)


def error_breakdown(model, processor, scenes) -> dict:
    """{"answer": {...}, "yes_by_area": {...}, "by_shape": {...}}: each key -> [n, accuracy]."""
    import numpy as np

    from csp_utils.vlm.embedded import heldout

    sets = heldout.pope_sets(scenes)
    items = [it for v in sets.values() for it in v]
    probs = heldout.unique_probabilities(model, processor, items, heldout.images_by_id(scenes))
    by_id = {s.scene_id: s for s in scenes}
    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for it, p in zip(items, probs):
        ok = bool((p > 0.5) == (it.label == "yes"))
        shape = it.objects[0]
        groups["answer"][it.label].append(ok)
        groups["by_shape"][f"{shape} ({it.label})"].append(ok)
        if it.label == "yes":
            area = max(int(o.mask.sum()) for o in by_id[it.image_id].objects if o.category == shape)
            groups["yes_by_area"][area_bin(area)].append(ok)
    return {g: {k: [len(v), round(float(np.mean(v)), 4)] for k, v in sorted(d.items())} for g, d in groups.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import torch

    from csp_utils.vlm import models
    from csp_utils.world import benchmarks
    from csp_utils.vlm.embedded.config import PretrainConfig, world_config

    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = models.load_vlm(args.model)
    model.eval()
    scenes = benchmarks.pope_scenes(args.scenes, world_config(PretrainConfig()), split="eval")
    out = error_breakdown(model, processor, scenes)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
