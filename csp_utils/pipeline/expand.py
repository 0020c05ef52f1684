"""A study's methods, base models, seeds and ablation families, expanded into its stages, its
named sizes put under them.

Params may say what the study is instead of listing every stage::

    bases: {embedded: null, embedded-noconf: noconf}    # base model -> its stage tag (the first: none)
    seeds: {paper_csp: 3, grounded_csp: 3, distilled: 1}
    data: {paper_csp: {n_scenes: 400}, grounded_csp: {n_scenes: 2400}}   # each dataset's source size
    sizes: study                                        # csp_utils/evaluate/suites.py's SIZES["study"]
    ablations:
      06_ablations@grounded:                            # the 06_ablations stage it ends in
        method: grounded_csp
        seeds: 3
        variants:
          grounded: {}                                  # the method itself: the reference
          loss CE: {tag: ce, sft: {loss: ce}}           # what differs
    stages:
      05_evaluate: {...}                                # every base model's evaluation settings

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
  (``@d{t}{k}`` / ``@a{t}{k}``) on the base's grounded dataset, or, where ``data`` gives the
  method other settings than grounded CSP's (``distilled_activated: {n_scenes: 4800}``), on rows
  of its own built like ``calibrated_activated``'s below.
* ``calibrated_activated``: rows of its own (half of them noised), one dataset per base model
  (``@calibrated_activated`` into ``calibrated_activated``, or ``..._{tag}`` into
  ``calibrated_activated@{tag}``), SFT stages ``03_train_sft@c{k}`` (``@c{t}{k}``).
* A seed count is a whole number (every base model) or a mapping of base model -> number
  (bases left out get none).
* ``05_evaluate`` (``@{tag}``, results under ``results/{tag}``): the base model and every
  adapter, reported per method and seed (``sft_simpo@s0``, ``grounded@s0=sft@g0``, ...).
  With ``split_evaluation: true`` its models are also evaluated in parts, listed right after
  the base's training so that they run beside it and each other: ``05_evaluate@base``,
  ``@paper_csp``, ``@grounded_csp``, ``@activated`` (the activated methods together: they share
  one answer turn per batch), ``@{tag}-{part}`` for another base, each with ``rows_only: true``;
  the base's own evaluation then finds their rows done and writes the tables.
* ``07_figures``: the other bases' results as ``more_results``.

An ablation family (``ablations``: the 06_ablations stage it ends in -> ``method``, ``seeds``,
``variants``) trains every variant on the first base model with the method's seeds 0..n-1 and
pairs each with the method itself, seed with seed; its stages come after the study's training,
seed by seed, and its 06_ablations stage after the evaluations. A variant (label -> what differs) is:

* ``{}``: the method itself, the reference (exactly one; the study's seeds must train n of it);
* a string: an entry given as it is (``base``);
* ``{tag, build, sft, simpo}``: the method with these settings, stages named ``@{tag}{k}`` (``k``
  left out for seed 0; grounded-family methods prefix their letter: ``@gce1``). With ``build``
  it trains on rows of its own, named after ``dataset`` (default: the tag): paper CSP's per seed
  (``02_build_perturbed_dataset@neg1`` into ``dataset@neg1``, data and noise seed k), a grounded
  method's once (``@gflip`` into ``grounded@flip``); else on the reference's rows;
* ``{regime: sft}`` (paper CSP): the reference's own SFT adapters (``sft@s{k}``), no stage;
  ``{regime: simpo, tag}``: SimPO from the base model on the reference's datasets
  (``04_train_simpo@{tag}{k}``, adapters ``simpo_only@s{k}``);
* ``{method}``: another grounded-family method in the reference's place, its stages its own
  (``03_train_sft@d{k}``), added for the seeds the study's ``seeds`` do not train.

The family's other keys are its 06_ablations stage's own parameters (``first_person``, ...); the
stage gets ``variants`` (an adapter the first base's evaluation scores named as it is there, so
its rows are reused), ``paired`` (the reference against every other variant), ``reference``
where it is not the notebook's default and, for ``06_ablations@TAG``, ``name: TAG``.

``sizes`` names an entry of ``csp_utils/evaluate/suites.py``'s ``SIZES``: its values go under
every stage of the notebooks it holds (00's world, 05's and 06's ``suite`` / ``scoring`` /
``boot``), a stage's own values winning, so a size is written once. Params without bases may
name sizes too (``params/smoke.yaml``).

A listed ``05_evaluate@{tag}`` is that base's evaluation settings in place of ``05_evaluate``'s.
Any other stage listed in ``stages`` is merged over the stages the expansion generates from it:
``03_train_sft`` over every ``03_train_sft`` and ``03_train_sft@...`` stage, ``03_train_sft@g1``
over that one stage (nested dicts merged key by key). A value the expansion itself sets
differently there (a seed, a dataset, a tag) is refused, naming both stages. A listed stage
the expansion does not generate is kept as given: those of notebooks 00 and 01 first, then the
expanded ones, then the rest in order. Two generated stages of one name are refused, naming
the methods, seeds and bases they stand for.
"""

from __future__ import annotations

import copy
import re

from csp_utils.pipeline.checks import notebook_defaults, unknown_name
from csp_utils.pipeline.stages import notebook_of
from csp_utils.train import methods

# the methods trained on each base's grounded rows, with the prefix of their SFT stages' tags
GROUNDED_FAMILY = (("grounded_csp", "g"), ("distilled", "d"), ("distilled_activated", "a"),
                   ("calibrated_activated", "c"))
METHOD_NAMES = ("paper_csp",) + tuple(method for method, _ in GROUNDED_FAMILY)
STUDY_KEYS = ("bases", "seeds", "data", "ablations", "split_evaluation")  # top-level params that the expansion reads
TOP_KEYS = STUDY_KEYS + ("sizes",)
FAMILY_KEYS = ("method", "seeds", "variants")  # an ablation's other keys are its 06_ablations stage's own
VARIANT_KEYS = ("tag", "dataset", "regime", "method", "build", "sft", "simpo")


def expand_study(params: dict) -> dict:
    """``params`` with ``bases``/``seeds``/``data``/``ablations`` replaced by the stages they stand
    for and ``sizes`` put under them; params without these keys are returned as they are."""
    out = _expand_methods(params) if any(k in params for k in STUDY_KEYS) else params
    return _with_sizes(out, params["sizes"]) if "sizes" in params else out


def _with_sizes(params: dict, name) -> dict:
    """The named sizes (``csp_utils/evaluate/suites.py``'s ``SIZES``) under every stage of the
    notebooks they hold; a stage's own values win."""
    from csp_utils.evaluate.suites import SIZES  # the suite's imports only where a params file names sizes

    if not isinstance(name, str) or name not in SIZES:
        raise ValueError(f"sizes: {unknown_name('sizes', name, SIZES)} (csp_utils/evaluate/suites.py: SIZES)")
    stages = {}
    for stage, given in params["stages"].items():
        under = SIZES[name].get(stage.split("@")[0])
        stages[stage] = methods.deep_merge(copy.deepcopy(under), given or {}) if under else given
    return {**{k: v for k, v in params.items() if k != "sizes"}, "stages": stages}


def _expand_methods(params: dict) -> dict:
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
    evaluations = {}
    for base, tag in bases.items():
        name = f"05_evaluate@{tag}" if tag else "05_evaluate"
        settings = (given.pop(name) or {}) if tag and name in given else template  # a base's own, else the template
        evaluations[name] = _evaluation(settings, base, tag, seeds, letters)
    for i, (base, tag) in enumerate(bases.items()):
        _training(made, base, tag, i == 0, seeds, data, letters.get(tag, ""))
        if split:  # listed after the base's training: each part starts as soon as its adapters exist
            whole = evaluations[f"05_evaluate@{tag}" if tag else "05_evaluate"]
            for part, value in _evaluation_parts(whole, tag).items():
                made.add(part, value, f"a part of the evaluation of base {base}")
    families = params.get("ablations") or {}
    if not isinstance(families, dict):
        raise ValueError(f"ablations: a mapping of 06_ablations stage -> its ablation family, got {families!r}")
    ablations = [_Ablation(name, family, first, seeds, data, evaluations["05_evaluate"]["models"])
                 for name, family in families.items()]
    for ablation in ablations:
        ablation.add_training(made)
    for name, value in evaluations.items():
        made.add(name, value, f"the evaluation of base {value.get('base_model', first)}")
    for ablation in ablations:
        made.add(ablation.name, ablation.stage(), f"the ablation family {ablation.name}")
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


def _rows_of(method: str, data: dict) -> str:
    """The dataset a grounded method trains on: grounded CSP's rows where its build and its
    ``data`` settings are theirs, else rows of its own (named after it)."""
    same_build = methods.method(method).build == methods.method("grounded_csp").build
    same_data = data.get(method, data.get("grounded_csp")) == data.get("grounded_csp")
    return "grounded" if same_build and same_data else method


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
    for rows in dict.fromkeys(_rows_of(m, data) for m, _ in GROUNDED_FAMILY):
        owner = "grounded_csp" if rows == "grounded" else rows
        for i, (base, tag) in enumerate(bases.items()):
            if any(_count(seeds, m, base) for m, _ in GROUNDED_FAMILY if _rows_of(m, data) == rows):
                made.add(f"02_build_perturbed_dataset@{rows}" + (f"_{tag}" if tag else ""), {
                    **_base(base, i == 0), **({"data": data[owner]} if owner in data else {}),
                    "dataset": _grounded_folder(tag, rows), "method": owner}, f"the {rows} dataset of base {base}")


def _grounded_folder(tag: str | None, rows: str = "grounded") -> str:
    return f"{rows}@{tag}" if tag else rows


def _training(made: _Generated, base: str, tag: str | None, first: bool, seeds: dict, data: dict, letter: str) -> None:
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
                **_base(base, first), "dataset": _grounded_folder(tag, _rows_of(method, data)), "method": method,
                **({"sft": {"seed": k}} if k else {})}, f"{method} seed {k} on base {base}")


def _evaluation(settings: dict, base: str, tag: str | None, seeds: dict, letters: dict) -> dict:
    """A base's evaluation: its settings, with the models and results folder the expansion's."""
    if {"models", "results", "base_model"} & set(settings):
        raise ValueError(f"05_evaluate{'@' + tag if tag else ''}: with bases and seeds, the models, results folder "
                         "and base model of each base model's evaluation are the expansion's")
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
    return {**where, "models": models, **settings}


# ------------------------------------------------------------------ ablation families
class _Ablation:
    """One ``ablations`` entry: a method and its variants on the first base model, each variant
    trained with the method's seeds 0..n-1, and the 06_ablations stage that pairs each variant
    with the method itself (the reference), seed with seed."""

    def __init__(self, name: str, family, first: str, seeds: dict, data: dict, evaluated: list[str]):
        where = f"ablations: {name}"
        if name.split("@")[0] != "06_ablations" or not _TAG.match(name.partition("@")[2] or "x"):
            raise ValueError(f"{where}: each key is the 06_ablations stage the family expands into "
                             "(06_ablations or 06_ablations@TAG)")
        if not isinstance(family, dict) or not all(k in family for k in FAMILY_KEYS):
            raise ValueError(f"{where}: a mapping with method, seeds and variants (label -> what differs), "
                             f"got {family!r}")
        self.name, self.where, self.first, self.data = name, where, first, data
        self.method, self.n, self.variants = family["method"], family["seeds"], family["variants"]
        self.extra = {k: v for k, v in family.items() if k not in FAMILY_KEYS}
        if self.method not in METHOD_NAMES:
            raise ValueError(f"{where}: method: {unknown_name('method', self.method, METHOD_NAMES)}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"{where}: seeds = {self.n!r} is not a number of seeds; it takes a whole number, "
                             "1 or more (e.g. seeds: 3)")
        if not isinstance(self.variants, dict) or not self.variants:
            raise ValueError(f"{where}: variants must be a mapping of label -> what differs from {self.method}")
        taken = {"variants", "reference", "paired", "name"} & set(self.extra)
        if taken:
            raise ValueError(f"{where}: {', '.join(sorted(taken))} of its 06_ablations stage are the expansion's")
        references = [label for label, v in self.variants.items() if not v and not isinstance(v, str)]
        if len(references) != 1:
            raise ValueError(f"{where}: exactly one variant must be {self.method} itself ({{}}), the reference the "
                             f"others are paired with; found {len(references)}")
        self.reference = references[0]
        if _count(seeds, self.method, first) < self.n:
            raise ValueError(f"{where}: the reference, {self.method} on {first}, has "
                             f"{_count(seeds, self.method, first)} seed(s) in seeds, the family {self.n}; give "
                             f"{self.method} {self.n} seeds on {first} or the family fewer")
        self.prefix = dict(GROUNDED_FAMILY).get(self.method, "")
        self.seeds = seeds
        self.entries = {m.split("=")[-1]: m for m in evaluated}  # adapter -> its entry in 05_evaluate's models
        self.stages: dict[str, tuple[dict, str, int]] = {}  # name -> value, origin, seed
        self.adapters = {label: self._variant(label, v) for label, v in self.variants.items()}

    def add_training(self, made: _Generated) -> None:
        """Seed by seed (datasets, then SFT, then SimPO), so that every variant's seed 0 comes first."""
        for name, (value, origin, _) in sorted(self.stages.items(), key=lambda s: (s[1][2], s[0].split("@")[0])):
            made.add(name, value, origin)

    def stage(self) -> dict:
        """The 06_ablations stage: adapters the first base's evaluation scores are named as there
        (06 reuses their rows)."""
        variants = {label: a if isinstance(a, str) else [self.entries.get(x, x) for x in a]
                    for label, a in self.adapters.items()}
        tag, reference = self.name.partition("@")[2], variants[self.reference][0]
        default = notebook_defaults(notebook_of("06_ablations"))["reference"]  # given only where it differs
        return {**({"name": tag} if tag else {}), "variants": variants,
                **({"reference": reference} if reference != default else {}),
                "paired": {self.reference: [v for v in variants if v != self.reference]}, **self.extra}

    # -------------------------------------------------------------- one variant
    def _variant(self, label: str, v) -> str | list[str]:
        where = f"{self.where}: variant {label!r}"
        if isinstance(v, str):
            return v  # an entry as the 06 notebook reads it, e.g. base
        if not v:
            return [self._reference(k) for k in range(self.n)]
        if not isinstance(v, dict):
            raise ValueError(f"{where}: a mapping of what differs ({', '.join(VARIANT_KEYS)}) or an entry such as "
                             f"base, got {v!r}")
        for key in v:
            if key not in VARIANT_KEYS:
                raise ValueError(f"{where}: {unknown_name('key', key, VARIANT_KEYS)}")
        for key in ("build", "sft", "simpo"):
            if not isinstance(v.get(key, {}), dict) or "seed" in v.get(key, {}):
                raise ValueError(f"{where}: {key} must be a mapping of settings without seed (the family's seeds "
                                 "give it)")
        if "dataset" in v and "build" not in v:
            raise ValueError(f"{where}: dataset names the rows the variant builds; give build settings too")
        if "method" in v:
            return self._other_method(where, v)
        if "regime" in v:
            return self._regime(where, v)
        if "tag" not in v or not isinstance(v["tag"], str) or not _TAG.match(v["tag"]):
            raise ValueError(f"{where}: a variant with settings needs a tag (letters, digits, '_' or '-'), what its "
                             "stages are named after")
        if self.prefix:
            return self._grounded(where, v)
        return self._paper(v)

    def _add(self, name: str, value: dict, label: str, k: int) -> None:
        if name in self.stages:
            raise ValueError(f"{self.where}: two variants expand to {name}; give them other tags")
        self.stages[name] = (value, f"{self.name}'s variant {label}, seed {k}", k)

    def _reference(self, k: int) -> str:
        return f"sft_simpo@s{k}" if self.method == "paper_csp" else f"sft@{self.prefix}{k}"

    def _paper_dataset(self, k: int) -> dict:
        return {"dataset": f"dataset@s{k}"} if k else {}

    def _paper(self, v: dict) -> list[str]:
        out = []
        for k in range(self.n):
            name = f"{v['tag']}{k or ''}"
            dataset = self._paper_dataset(k)
            if "build" in v:
                rows = f"{v.get('dataset', v['tag'])}{k or ''}"
                data = {"data": self.data["paper_csp"]} if "paper_csp" in self.data else {}
                self._add(f"02_build_perturbed_dataset@{rows}", {**data, "build": _with_seed(v["build"], k)},
                          v["tag"], k)
                dataset = {"dataset": f"dataset@{rows}"}
            for notebook, key in (("03_train_sft", "sft"), ("04_train_simpo", "simpo")):
                settings = _with_seed(v.get(key, {}), k)
                self._add(f"{notebook}@{name}", {**dataset, **({key: settings} if settings else {})}, v["tag"], k)
            out.append(f"sft_simpo@{name}")
        return out

    def _grounded(self, where: str, v: dict) -> list[str]:
        if "simpo" in v:
            raise ValueError(f"{where}: {self.method} trains no SimPO stage; give sft or build settings")
        rows = _rows_of(self.method, self.data)
        folder = rows
        if "build" in v:
            ds = v.get("dataset", v["tag"])
            folder = f"{rows}@{ds}"
            owner = "grounded_csp" if rows == "grounded" else rows
            self._add(f"02_build_perturbed_dataset@{self.prefix}{ds}", {
                **({"data": self.data[owner]} if owner in self.data else {}), "dataset": folder, "method": owner,
                "build": v["build"]}, v["tag"], 0)
        out = []
        for k in range(self.n):
            name = f"{self.prefix}{v['tag']}{k or ''}"
            settings = _with_seed(v.get("sft", {}), k)
            self._add(f"03_train_sft@{name}", {"dataset": folder, "method": self.method,
                                               **({"sft": settings} if settings else {})}, v["tag"], k)
            out.append(f"sft@{name}")
        return out

    def _regime(self, where: str, v: dict) -> list[str]:
        """The reference trained another way: ``sft``, its SFT stages alone (no stage of its own);
        ``simpo``, SimPO from the base model on the reference's datasets (stages named after tag)."""
        if self.method != "paper_csp" or v["regime"] not in ("sft", "simpo"):
            raise ValueError(f"{where}: regime is sft (the reference's SFT alone) or simpo (SimPO from the base "
                             f"model), for paper_csp only; got {v['regime']!r} for {self.method}")
        if v["regime"] == "sft":
            if set(v) != {"regime"}:
                raise ValueError(f"{where}: regime sft is the reference's own SFT adapters; it takes nothing else")
            return [f"sft@s{k}" for k in range(self.n)]
        if set(v) - {"regime", "tag", "simpo"} or not _TAG.match(str(v.get("tag", ""))):
            raise ValueError(f"{where}: regime simpo takes a tag (its stages' names) and simpo settings only")
        for k in range(self.n):
            settings = _with_seed(v.get("simpo", {}), k)
            self._add(f"04_train_simpo@{v['tag']}{k or ''}", {
                "regime": "simpo", "tag": f"@s{k}", **self._paper_dataset(k),
                **({"simpo": settings} if settings else {})}, v["tag"], k)
        return [f"simpo_only@s{k}" for k in range(self.n)]

    def _other_method(self, where: str, v: dict) -> list[str]:
        """Another method of the grounded family in the reference's place: its own stages
        (``03_train_sft@d{k}``), added for the seeds the study's seeds do not train."""
        method = v["method"]
        prefixes = dict(GROUNDED_FAMILY)
        if method not in prefixes or set(v) != {"method"}:
            raise ValueError(f"{where}: method names a method trained on the grounded rows "
                             f"({', '.join(prefixes)}) and takes nothing else; got {v!r}")
        for k in range(_count(self.seeds, method, self.first), self.n):
            self._add(f"03_train_sft@{prefixes[method]}{k}", {
                "dataset": _rows_of(method, self.data), "method": method, **({"sft": {"seed": k}} if k else {})}, method, k)
        return [f"sft@{prefixes[method]}{k}" for k in range(self.n)]


# the evaluation's parts: the model groups that share nothing with each other and can run side by side
# (activated adapters share one answer turn per batch, so their methods form one part)
def _part_of(model: str) -> str:
    group = model.split("=", 1)[0].split("@", 1)[0]
    fixed = {"base": "base", "sft_simpo": "paper_csp"}
    if group in fixed:
        return fixed[group]
    name = next(m for m, _ in GROUNDED_FAMILY if methods.method(m).reports_as == group)
    return "activated" if methods.method(name).sft.get("lora", {}).get("activation") else name


def _evaluation_parts(whole: dict, tag: str | None) -> dict[str, dict]:
    """The stages that evaluate one base's models (its evaluation ``whole``) part by part
    (``rows_only: true``), ``05_evaluate@{part}`` for the first base, ``05_evaluate@{tag}-{part}``
    for another; the base's own evaluation then finds their rows and writes the tables."""
    parts: dict[str, list] = {}
    for model in whole["models"]:
        parts.setdefault(_part_of(model), []).append(model)
    return {f"05_evaluate@{part}" if tag is None else f"05_evaluate@{tag}-{part}":
            {**whole, "models": models, "rows_only": True} for part, models in parts.items()}


def _figures(given: dict, bases: dict) -> dict:
    more = {base: tag for base, tag in list(bases.items())[1:]}
    return {**(given or {}), **({"more_results": more} if more else {})}
