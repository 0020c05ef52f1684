"""A study's methods, base models and seeds, expanded into its stages.

Params may say what the study is instead of listing every stage::

    bases: {embedded: null, embedded-noconf: noconf}    # base model -> its stage tag (the first: none)
    seeds: {paper_csp: 3, grounded_csp: 3, distilled: 1}
    data: {paper_csp: {n_scenes: 400}, grounded_csp: {n_scenes: 2400}}   # each dataset's source size
    stages:
      05_evaluate: {...}                                # every base model's evaluation starts from this

The expansion writes the stages the study has always had, under the same names (markers and
run folders use them):

* ``paper_csp``, seed k: one dataset for every base model (``02_build_perturbed_dataset``,
  ``@s1``, ...; data and noise seed k), and per base model SFT then SimPO from that dataset:
  ``03_train_sft`` / ``04_train_simpo`` tagged ``@s0`` for the first base's seed 0, else
  ``@s{k}``; ``@{tag}``, ``@{tag}{k}`` for another base's.
* ``grounded_csp``: one grounded dataset per base model (``@grounded`` into ``grounded``, or
  ``@grounded_{tag}`` into ``grounded@{tag}``: rows record that base's own answers), and SFT
  stages ``03_train_sft@g{k}`` (another base: ``@g{t}{k}``, ``t`` the shortest start of its tag
  that no other base's tag starts with: ``noconf`` alone gives ``n``, beside ``nodeep`` ``noc``).
* ``distilled``, ``distilled_activated``: SFT stages ``03_train_sft@d{k}`` / ``@a{k}``
  (``@d{t}{k}`` / ``@a{t}{k}``) on the base's grounded dataset.
* ``calibrated_activated``: rows of its own (half of them noised), one dataset per base model
  (``@calibrated_activated`` into ``calibrated_activated``, or ``..._{tag}`` into
  ``calibrated_activated@{tag}``), SFT stages ``03_train_sft@c{k}`` (``@c{t}{k}``).
* A seed count is a whole number (every base model) or a mapping of base model -> number
  (bases left out get none).
* ``05_evaluate`` (``@{tag}``, results under ``results/{tag}``): the base model and every
  adapter, reported per method and seed (``sft_simpo@s0``, ``grounded@s0=sft@g0``, ...).
* ``07_figures``: the other bases' results as ``more_results``.

A stage listed in ``stages`` is merged over the stages the expansion generates from it:
``03_train_sft`` over every ``03_train_sft`` and ``03_train_sft@...`` stage, ``03_train_sft@g1``
over that one stage (nested dicts merged key by key). A value the expansion itself sets
differently there (a seed, a dataset, a tag) is refused, naming both stages. A listed stage
the expansion does not generate is kept as given: those of notebooks 00 and 01 first, then the
expanded ones, then the rest in order. Two generated stages of one name are refused, naming
the methods, seeds and bases they stand for.
"""

from __future__ import annotations

import re

from csp_utils.pipeline.checks import unknown_name
from csp_utils.train import methods

# the methods trained on each base's grounded rows, with the prefix of their SFT stages' tags
GROUNDED_FAMILY = (("grounded_csp", "g"), ("distilled", "d"), ("distilled_activated", "a"),
                   ("calibrated_activated", "c"))
METHOD_NAMES = ("paper_csp",) + tuple(method for method, _ in GROUNDED_FAMILY)
STUDY_KEYS = ("bases", "seeds", "data", "split_evaluation")  # top-level params that the expansion reads


def expand_study(params: dict) -> dict:
    """``params`` with ``bases``/``seeds``/``data`` replaced by the stages they stand for; params
    without them are returned as they are."""
    if not any(k in params for k in STUDY_KEYS):
        return params
    missing = [k for k in ("bases", "seeds") if k not in params]
    if missing:
        raise ValueError(f"a study given by methods needs {' and '.join(missing)} too")
    bases, seeds, data = params["bases"], params["seeds"], params.get("data") or {}
    _check_bases(bases)
    _check_seeds(seeds, data, bases)
    given = dict(params.get("stages") or {})
    template = given.pop("05_evaluate", None) or {}
    if "models" in template or "results" in template:
        raise ValueError("05_evaluate: with bases and seeds, the models and results folder of each base model's "
                         "evaluation are the expansion's")
    first = params.get("base_model", "embedded")
    if list(bases)[0] != first:
        raise ValueError(f"bases: the first base model must be the study's base_model ({first!r})")

    split = params.get("split_evaluation", False)
    if not isinstance(split, bool):
        raise ValueError(f"split_evaluation: true or false, got {split!r}")

    made = _Generated()
    letters = _tag_letters(bases)
    _datasets(made, bases, seeds, data)
    for i, (base, tag) in enumerate(bases.items()):
        _training(made, base, tag, i == 0, seeds, letters.get(tag, ""))
        if split:
            for part, models in _evaluation_parts(template, base, tag, seeds, letters).items():
                made.add(part, models, f"a part of the evaluation of base {base}")
    for i, (base, tag) in enumerate(bases.items()):
        made.add(f"05_evaluate@{tag}" if tag else "05_evaluate", _evaluation(template, base, tag, seeds, letters),
                 f"the evaluation of base {base}")
    generated = _merge_given(made.stages, given)
    stages = {k: v for k, v in given.items() if k.split("@")[0] < "02" and k not in generated}
    stages.update(generated)
    for name, value in given.items():
        if name not in stages and not _generated_from(name, generated):
            stages[name] = _figures(value, bases) if name == "07_figures" else value
    out = {k: v for k, v in params.items() if k not in STUDY_KEYS}
    out["stages"] = stages
    return out


class _Generated:
    """The expanded stages, each with what it stands for, so that a second stage of one name is
    refused naming both instead of replacing the first."""

    def __init__(self):
        self.stages: dict[str, dict] = {}
        self.origins: dict[str, str] = {}

    def add(self, name: str, value: dict, origin: str) -> None:
        if name in self.stages:
            raise ValueError(f"bases/seeds expand to two stages named {name}: {self.origins[name]} and {origin}; "
                             "give the bases tags that start differently")
        self.stages[name], self.origins[name] = value, origin


_TAG = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def _check_bases(bases) -> None:
    if not isinstance(bases, dict) or not bases or list(bases.values())[0] is not None:
        raise ValueError("bases: a mapping of base model -> stage tag whose first entry has no tag (null)")
    tags = list(bases.values())[1:]
    for base, tag in list(bases.items())[1:]:
        if not isinstance(tag, str) or not _TAG.match(tag):
            raise ValueError(f"bases: {base}'s tag {tag!r} must be a name of letters, digits, '_' or '-' starting "
                             "with a letter (only the first base has none)")
    twice = sorted({t for t in tags if tags.count(t) > 1})
    if twice:
        raise ValueError(f"bases: the tag {twice[0]!r} is given to two base models; each base needs its own")


def _check_seeds(seeds, data, bases) -> None:
    if not isinstance(seeds, dict):
        raise ValueError(f"seeds: a mapping of method -> number of seeds, got {seeds!r}")
    if not isinstance(data, dict):
        raise ValueError(f"data: a mapping of method -> data settings, got {data!r}")
    for what, names in (("seeds", seeds), ("data", data)):
        for method in names:
            if method not in METHOD_NAMES:
                raise ValueError(f"{what}: {unknown_name('method', method, METHOD_NAMES)}")
    for method, count in seeds.items():
        if isinstance(count, dict):
            for base in count:
                if base not in bases:
                    raise ValueError(f"seeds: {method} names a base model outside bases: "
                                     f"{unknown_name('base model', base, list(bases))}")
        for n in (count.values() if isinstance(count, dict) else [count]):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"seeds: {method} = {count!r} is not a number of seeds; it takes a whole number, "
                                 "0 or more, or a mapping of base model -> number (e.g. seeds: {" + f"{method}: 3" + "})")
    for method, value in data.items():
        if not isinstance(value, dict):
            raise ValueError(f"data: {method} = {value!r} must be a mapping of data settings, e.g. {{n_scenes: 400}}")


def _tag_letters(bases: dict) -> dict:
    """Each tag's shortest start that no other tag starts with (the whole tag when there is
    none), what the grounded family's stage names carry: distinct tags give distinct names."""
    tags = [t for t in bases.values() if t]
    letters = {}
    for tag in tags:
        others = [t for t in tags if t != tag]
        letters[tag] = next((tag[:n] for n in range(1, len(tag) + 1)
                             if not any(o.startswith(tag[:n]) for o in others)), tag)
    return letters


def _generated_from(name: str, generated: dict) -> list[str]:
    """The generated stages a listed stage applies to: ``NAME`` every stage of notebook NAME,
    ``NAME@TAG`` that stage only."""
    if "@" in name:
        return [name] if name in generated else []
    return [s for s in generated if s.split("@")[0] == name]


def _merge(base: dict, over: dict, at: str, clash) -> dict:
    out = dict(base)
    for key, value in (over or {}).items():
        where = f"{at}.{key}" if at else key
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, where, clash)
        elif key in out and out[key] != value:
            clash(where, out[key], value)
        else:
            out[key] = value
    return out


def _merge_given(generated: dict, given: dict) -> dict:
    """Listed stages merged over the generated ones (``NAME`` first, then ``NAME@TAG``)."""
    merged = dict(generated)
    for name in sorted(given, key=lambda n: "@" in n):
        if name == "07_figures":
            continue
        for target in _generated_from(name, generated):
            def clash(where, ours, theirs, target=target, name=name):
                raise ValueError(f"stages: {name} sets {where} = {theirs!r}, but the expansion of bases/seeds sets "
                                 f"it to {ours!r} in {target}; remove it from {name}, or set it in that stage "
                                 "only when the expansion does not")
            merged[target] = _merge(merged[target], given[name] or {}, "", clash)
    return merged


def _count(seeds: dict, method: str, base: str) -> int:
    n = seeds.get(method, 0)
    return n.get(base, 0) if isinstance(n, dict) else n


def _rows_of(method: str) -> str:
    """The dataset a grounded method trains on: grounded CSP's rows where its build is theirs,
    else rows of its own (named after it)."""
    return "grounded" if methods.method(method).build == methods.method("grounded_csp").build else method


def _paper_tag(tag: str | None, k: int, first: bool) -> str:
    if tag is None:
        return f"s{k}"
    return tag if k == 0 else f"{tag}{k}"


def _with_seed(fields: dict, k: int) -> dict:
    return {**fields, "seed": k} if k else dict(fields)


def _base(base: str, first: bool) -> dict:
    return {} if first else {"base_model": base}


def _datasets(made: _Generated, bases: dict, seeds: dict, data: dict) -> None:
    for k in range(max(_count(seeds, "paper_csp", b) for b in bases)):
        made.add("02_build_perturbed_dataset" + (f"@s{k}" if k else ""), {
            **({"data": data["paper_csp"]} if "paper_csp" in data else {}), **({"build": {"seed": k}} if k else {})},
            f"paper_csp's dataset of seed {k}")
    for rows in dict.fromkeys(_rows_of(m) for m, _ in GROUNDED_FAMILY):
        owner = "grounded_csp" if rows == "grounded" else rows
        for i, (base, tag) in enumerate(bases.items()):
            if any(_count(seeds, m, base) for m, _ in GROUNDED_FAMILY if _rows_of(m) == rows):
                made.add(f"02_build_perturbed_dataset@{rows}" + (f"_{tag}" if tag else ""), {
                    **_base(base, i == 0), **({"data": data[owner]} if owner in data else {}),
                    "dataset": _grounded_folder(tag, rows), "method": owner}, f"the {rows} dataset of base {base}")


def _grounded_folder(tag: str | None, rows: str = "grounded") -> str:
    return f"{rows}@{tag}" if tag else rows


def _training(made: _Generated, base: str, tag: str | None, first: bool, seeds: dict, letter: str) -> None:
    for k in range(_count(seeds, "paper_csp", base)):
        name = _paper_tag(tag, k, first)
        own = {**_base(base, first), **({"tag": "@s0"} if first and k == 0 else {}),
               **({"dataset": f"dataset@s{k}"} if k else {})}
        suffix = "" if first and k == 0 else f"@{name}"
        origin = f"paper_csp seed {k} on base {base}"
        made.add("03_train_sft" + suffix, {**own, **({"sft": {"seed": k}} if k else {})}, origin)
        made.add("04_train_simpo" + suffix, {**own, **({"simpo": {"seed": k}} if k else {})}, origin)
    for method, prefix in GROUNDED_FAMILY:
        for k in range(_count(seeds, method, base)):
            made.add(f"03_train_sft@{prefix}{letter}{k}", {
                **_base(base, first), "dataset": _grounded_folder(tag, _rows_of(method)), "method": method,
                **({"sft": {"seed": k}} if k else {})}, f"{method} seed {k} on base {base}")


def _evaluation(template: dict, base: str, tag: str | None, seeds: dict, letters: dict) -> dict:
    models = ["base"]
    for k in range(_count(seeds, "paper_csp", base)):
        adapter = f"sft_simpo@{_paper_tag(tag, k, tag is None)}"
        label = f"sft_simpo@s{k}"
        models.append(label if adapter == label else f"{label}={adapter}")
    letter = letters.get(tag, "")
    for method, prefix in GROUNDED_FAMILY:
        label = methods.method(method).reports_as
        models += [f"{label}@s{k}=sft@{prefix}{letter}{k}" for k in range(_count(seeds, method, base))]
    where = {} if tag is None else {"base_model": base, "results": f"results/{tag}"}
    return {**where, "models": models, **template}


# the evaluation's parts: the model groups that share nothing with each other and can run side by side
# (activated adapters share one answer turn per batch, so their methods form one part)
def _part_of(model: str) -> str:
    group = model.split("=", 1)[0].split("@", 1)[0]
    if group in ("base", "sft_simpo"):
        return {"base": "base", "sft_simpo": "paper_csp"}[group]
    name = next(m for m, _ in GROUNDED_FAMILY if methods.method(m).reports_as == group)
    return "activated" if methods.method(name).sft.get("lora", {}).get("activation") else name


def _evaluation_parts(template: dict, base: str, tag: str | None, seeds: dict, letters: dict) -> dict[str, dict]:
    """The stages that evaluate one base's models part by part (``rows_only: true``),
    ``05_evaluate@{part}`` for the first base, ``05_evaluate@{tag}-{part}`` for another; the
    base's own evaluation then finds their rows and writes the tables."""
    whole = _evaluation(template, base, tag, seeds, letters)
    parts: dict[str, list] = {}
    for model in whole["models"]:
        parts.setdefault(_part_of(model), []).append(model)
    return {f"05_evaluate@{part}" if tag is None else f"05_evaluate@{tag}-{part}":
            {**whole, "models": models, "rows_only": True} for part, models in parts.items()}


def _figures(given: dict, bases: dict) -> dict:
    more = {base: tag for base, tag in list(bases.items())[1:]}
    return {**(given or {}), **({"more_results": more} if more else {})}
