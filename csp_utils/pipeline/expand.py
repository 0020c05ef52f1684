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
  stages ``03_train_sft@g{k}`` (another base: ``@g{t}{k}``, ``t`` its tag's first letter).
* ``distilled``, ``distilled_activated``: SFT stages ``03_train_sft@d{k}`` / ``@a{k}``
  (``@d{t}{k}`` / ``@a{t}{k}``) on the base's grounded dataset.
* ``calibrated_activated``: rows of its own (half of them noised), one dataset per base model
  (``@calibrated_activated`` into ``calibrated_activated``, or ``..._{tag}`` / ``...@{tag}``),
  SFT stages ``03_train_sft@c{k}`` (``@c{t}{k}``).
* A seed count is a number (every base model) or a mapping of base model -> number (bases
  left out get none).
* ``05_evaluate`` (``@{tag}``, results under ``results/{tag}``): the base model and every
  adapter, reported per method and seed (``sft_simpo@s0``, ``grounded@s0=sft@g0``, ...).
* ``07_figures``: the other bases' results as ``more_results``.

Stages listed in ``stages`` are kept as given: those of notebooks 00 and 01 first, then the
expanded ones, then the rest in order.
"""

from __future__ import annotations

from csp_utils.train import methods

# the methods trained on each base's grounded rows, with the prefix of their SFT stages' tags
GROUNDED_FAMILY = (("grounded_csp", "g"), ("distilled", "d"), ("distilled_activated", "a"),
                   ("calibrated_activated", "c"))
METHOD_NAMES = ("paper_csp",) + tuple(method for method, _ in GROUNDED_FAMILY)
STUDY_KEYS = ("bases", "seeds", "data")  # top-level params that the expansion reads


def expand_study(params: dict) -> dict:
    """``params`` with ``bases``/``seeds``/``data`` replaced by the stages they stand for; params
    without them are returned as they are."""
    if not any(k in params for k in STUDY_KEYS):
        return params
    missing = [k for k in ("bases", "seeds") if k not in params]
    if missing:
        raise ValueError(f"a study given by methods needs {' and '.join(missing)} too")
    bases, seeds, data = params["bases"], params["seeds"], params.get("data") or {}
    if not isinstance(bases, dict) or not bases or list(bases.values())[0] is not None:
        raise ValueError("bases: a mapping of base model -> stage tag whose first entry has no tag (null)")
    unknown = sorted(set(seeds) - set(METHOD_NAMES)) + sorted(set(data) - set(METHOD_NAMES))
    if unknown:
        raise ValueError(f"seeds/data: unknown method(s) {unknown}; methods: {', '.join(METHOD_NAMES)}")
    given = dict(params.get("stages") or {})
    template = given.pop("05_evaluate", None) or {}
    if "models" in template or "results" in template:
        raise ValueError("05_evaluate: with bases and seeds, the models and results folder of each base model's "
                         "evaluation are the expansion's")
    first = params.get("base_model", "embedded")
    if list(bases)[0] != first:
        raise ValueError(f"bases: the first base model must be the study's base_model ({first!r})")

    stages = {k: v for k, v in given.items() if k.split("@")[0] < "02"}
    for method, n in seeds.items():
        counts = n.values() if isinstance(n, dict) else [n]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError(f"seeds: {method} takes a seed count (>= 0) or a mapping base model -> count, got {n!r}")
        if isinstance(n, dict) and set(n) - set(bases):
            raise ValueError(f"seeds: {method} names base models outside bases: {sorted(set(n) - set(bases))}")
    stages.update(_datasets(bases, seeds, data))
    for i, (base, tag) in enumerate(bases.items()):
        stages.update(_training(base, tag, i == 0, seeds))
    for i, (base, tag) in enumerate(bases.items()):
        stages[f"05_evaluate@{tag}" if tag else "05_evaluate"] = _evaluation(template, base, tag, seeds)
    for name, value in given.items():
        if name not in stages:
            stages[name] = _figures(value, bases) if name == "07_figures" else value
    out = {k: v for k, v in params.items() if k not in STUDY_KEYS}
    out["stages"] = stages
    return out


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


def _datasets(bases: dict, seeds: dict, data: dict) -> dict:
    stages = {}
    for k in range(max([_count(seeds, "paper_csp", b) for b in bases] or [0])):
        stages["02_build_perturbed_dataset" + (f"@s{k}" if k else "")] = {
            **({"data": data["paper_csp"]} if "paper_csp" in data else {}), **({"build": {"seed": k}} if k else {})}
    for rows in dict.fromkeys(_rows_of(m) for m, _ in GROUNDED_FAMILY):
        owner = "grounded_csp" if rows == "grounded" else rows
        for i, (base, tag) in enumerate(bases.items()):
            if any(_count(seeds, m, base) for m, _ in GROUNDED_FAMILY if _rows_of(m) == rows):
                stages[f"02_build_perturbed_dataset@{rows}" + (f"_{tag}" if tag else "")] = {
                    **_base(base, i == 0), **({"data": data[owner]} if owner in data else {}),
                    "dataset": _grounded_folder(tag, rows), "method": owner}
    return stages


def _grounded_folder(tag: str | None, rows: str = "grounded") -> str:
    return f"{rows}@{tag}" if tag else rows


def _training(base: str, tag: str | None, first: bool, seeds: dict) -> dict:
    stages = {}
    for k in range(_count(seeds, "paper_csp", base)):
        name = _paper_tag(tag, k, first)
        own = {**_base(base, first), **({"tag": "@s0"} if first and k == 0 else {}),
               **({"dataset": f"dataset@s{k}"} if k else {})}
        suffix = "" if first and k == 0 else f"@{name}"
        stages["03_train_sft" + suffix] = {**own, **({"sft": {"seed": k}} if k else {})}
        stages["04_train_simpo" + suffix] = {**own, **({"simpo": {"seed": k}} if k else {})}
    letter = tag[0] if tag else ""
    for method, prefix in GROUNDED_FAMILY:
        for k in range(_count(seeds, method, base)):
            stages[f"03_train_sft@{prefix}{letter}{k}"] = {
                **_base(base, first), "dataset": _grounded_folder(tag, _rows_of(method)), "method": method,
                **({"sft": {"seed": k}} if k else {})}
    return stages


def _evaluation(template: dict, base: str, tag: str | None, seeds: dict) -> dict:
    models = ["base"]
    for k in range(_count(seeds, "paper_csp", base)):
        adapter = f"sft_simpo@{_paper_tag(tag, k, tag is None)}"
        label = f"sft_simpo@s{k}"
        models.append(label if adapter == label else f"{label}={adapter}")
    letter = tag[0] if tag else ""
    for method, prefix in GROUNDED_FAMILY:
        label = methods.method(method).reports_as
        models += [f"{label}@s{k}=sft@{prefix}{letter}{k}" for k in range(_count(seeds, method, base))]
    where = {} if tag is None else {"base_model": base, "results": f"results/{tag}"}
    return {**where, "models": models, **template}


def _figures(given: dict, bases: dict) -> dict:
    more = {base: tag for base, tag in list(bases.items())[1:]}
    return {**(given or {}), **({"more_results": more} if more else {})}
