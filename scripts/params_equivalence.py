"""Compare two params files stage by stage on what each stage finally runs with.

    python scripts/params_equivalence.py OLD.yaml NEW.yaml [--old-without-methods] [--set KEY=VALUE ...]

Each file is planned as the driver plans it (methods, bases and seeds expanded; every
parameter checked), then each stage's parameters are resolved the way its notebook resolves
them: notebook defaults filled in, the method's settings and the hardware preset under the
given ``build`` / ``sft`` / ``simpo`` fields, config dicts turned into their dataclasses with
every default. ``--old-without-methods`` reads OLD as written before notebooks took a
``method`` (no method layer). Prints the stages only in one file and every differing value;
exits 1 when there is any.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from csp_utils.dataset import buildconfig, coco
from csp_utils.evaluate import evaluation, suites
from csp_utils.pipeline import checks, planning, stages
from csp_utils.train import methods, settings

TRAINING = {"03_train_sft": "sft", "04_train_simpo": "simpo"}


def _plain(obj):
    return json.loads(json.dumps(obj, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else
                                 list(o) if isinstance(o, tuple) else str(o)))


def resolve(stage: str, parameters: dict, with_methods: bool) -> dict:
    notebook = stage.split("@")[0]
    full = {**checks.notebook_defaults(stages.notebook_of(stage)), **parameters}
    method = full.pop("method", None) if with_methods else full.pop("method", None) and None
    if notebook == "02_build_perturbed_dataset":
        fields = methods.build_fields(method, full["build"]) if method else dict(full["build"])
        full["build"] = buildconfig.BuildConfig(**fields).to_dict()
        full["data"] = {**checks._fields((coco.make_source, ())), **full["data"]}
    elif notebook in TRAINING:
        key = TRAINING[notebook]
        configs = settings.make_configs(full.pop("preset"), method=method, **{key: full[key]})
        full[key] = dataclasses.asdict(getattr(configs, key))
    elif notebook in ("05_evaluate", "06_ablations"):
        full["suite"] = dataclasses.asdict(suites.SuiteConfig(**full["suite"]))
        full["scoring"] = dataclasses.asdict(evaluation.EvalConfig(**full["scoring"]))
    return _plain(full)


def effective(path: Path, with_methods: bool = True, overrides: dict | None = None) -> dict[str, dict]:
    plan = planning.plan_study(planning.apply_overrides(planning.load_params(path), overrides or {}))
    return {s.name: resolve(s.name, s.parameters, with_methods) for s in plan}


def differences(old: dict, new: dict) -> list[str]:
    out = [f"only in the old file: {s}" for s in old if s not in new]
    out += [f"only in the new file: {s}" for s in new if s not in old]
    for s in old:
        if s in new and old[s] != new[s]:
            keys = sorted(set(old[s]) | set(new[s]))
            out += [f"{s}: {k}: {old[s].get(k)!r} -> {new[s].get(k)!r}" for k in keys if old[s].get(k) != new[s].get(k)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--old-without-methods", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="as the driver's --set, for both files")
    args = ap.parse_args()
    overrides = dict(planning.parse_set(item) for item in args.set)
    old = effective(args.old, not args.old_without_methods, dict(overrides))
    new = effective(args.new, True, dict(overrides))
    diff = differences(old, new)
    print("\n".join(diff) if diff else f"{len(new)} stages, the same effective parameters in each")
    sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
