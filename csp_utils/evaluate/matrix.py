"""The evaluation matrix: models x sets, each model's rows written as JSONL per set
(``results/matrix/<model>/<set>.jsonl``) and read back; model entries of the notebooks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from csp_utils.core import baselines


# ------------------------------------------------------------------ the evaluation matrix
@dataclass
class ModelSpec:
    name: str                       # e.g. "base", "sft_simpo@s1"
    base_model: str = "embedded"
    adapter: str | None = None      # PEFT adapter folder
    adapter_scope: str | None = None  # "all" | "confidence"; None: the adapter's record decides
    layout: str | None = None         # confidence prompt layout; None: the adapter's record decides


def results_path(results_dir, model: str, set_name: str) -> Path:
    return Path(results_dir) / model.replace("/", "_") / f"{set_name}.jsonl"


def evaluate_models(specs: list[ModelSpec], suite: dict, results_dir, config=None, sets: list[str] | None = None,
                    load_kwargs: dict | None = None, reuse_answers: bool = True, share_answer_turn: bool = True):
    """Every model on every set; resumable (finished rows are skipped by ``evaluation``).
    ``load_kwargs`` go to ``models.load_vlm`` (e.g. ``{"dtype": "bfloat16", "device_map": "auto"}``).

    ``reuse_answers``: a confidence-only adapter takes its answer-turn fields from the rows of
    the first confidence-only adapter evaluated before it in this call on the same base model
    with the same PEFT config (:func:`answer_key`), instead of generating the same answers
    again. Only sets that both evaluations run from the start here qualify, so the answers come
    from the same batches as a new generation would: the rows are identical either way.

    ``share_answer_turn``: activated adapters that continue the answer turn (the follow-up
    layout, :func:`evaluation.continues_answer_turn`) with one answer key are loaded onto one
    model and evaluated batch-major (:func:`evaluation.evaluate_adapters`): each batch's answer
    turn runs once and every adapter continues its cache. Each adapter's rows are the ones it
    gets evaluated alone without ``reuse_answers``. One process only; sets where their results
    files hold different finished questions are evaluated adapter by adapter.
    """
    from csp_utils.evaluate import evaluation

    config = config or evaluation.EvalConfig()
    kwargs = model_kwargs(load_kwargs)
    paths: dict[tuple[int, str], Path] = {}
    sources: dict[tuple, tuple[Path, str]] = {}   # (answer key, set) -> (results file, model)
    names = [name for name in suite if sets is None or name in sets]
    for block in _blocks(specs, config, share_answer_turn):
        model, processor = _load_block(block, kwargs)
        for name in names:
            bench = suite[name]
            together = [m for m in block if not evaluation.load_results(results_path(results_dir, m.spec.name, name))]
            if len(block) > 1 and len(together) > 1:
                members = [(results_path(results_dir, m.spec.name, name), m.spec.name, m.adapter) for m in together]
                evaluation.evaluate_adapters(model, processor, bench, members, together[0].cfg)
                paths |= {(m.index, name): out for m, (out, _, _) in zip(together, members)}
                if reuse_answers:
                    sources.setdefault((answer_key(together[0].spec, together[0].cfg), name), members[0][:2])
            for m in block:
                if (m.index, name) in paths:
                    continue
                if len(block) > 1:
                    model.set_adapter(m.adapter)
                key = answer_key(m.spec, m.cfg) if reuse_answers else None
                path = results_path(results_dir, m.spec.name, name)
                fresh = key is not None and not evaluation.load_results(path)
                source = sources.get((key, name)) if fresh else None
                paths[(m.index, name)] = evaluation.evaluate(model, processor, bench, path, m.spec.name, m.cfg,
                                                             answers_from=source)
                if fresh and source is None:
                    sources[(key, name)] = (path, m.spec.name)
        del model
    return [paths[(i, name)] for i in range(len(specs)) for name in names]


@dataclass
class _Member:
    index: int          # in the specs given
    spec: ModelSpec
    cfg: object         # its evaluation config
    adapter: str        # its PEFT adapter name on the block's model


def _blocks(specs: list[ModelSpec], config, share: bool) -> list[list[_Member]]:
    """The specs as blocks that share one loaded model: activated adapters that continue the
    answer turn with one answer key and one config together (placed where the first of them
    is), every other spec alone."""
    from csp_utils.evaluate import evaluation

    blocks: list[list[_Member]] = []
    groups: dict[tuple, list[_Member]] = {}
    for i, spec in enumerate(specs):
        cfg = evaluation.config_for_adapter(config, spec.adapter, spec.adapter_scope, spec.layout)
        key = _continuable(spec, cfg) if share else None
        if key is None:
            blocks.append([_Member(i, spec, cfg, "default")])
            continue
        group = (key, repr(cfg))
        if group not in groups:
            groups[group] = []
            blocks.append(groups[group])
        members = groups[group]
        members.append(_Member(i, spec, cfg, "default" if not members else f"adapter{len(members)}"))
    return blocks


def _continuable(spec: ModelSpec, cfg) -> tuple | None:
    """The answer key of an activated adapter whose confidence prompts continue the answer turn
    (confidence-only scope, follow-up layout, the cache kept), else None."""
    key = answer_key(spec, cfg)   # None but for a confidence-only adapter; holds its PEFT config
    if key is None or cfg.layout != "follow_up" or not cfg.continue_answer_cache:
        return None
    return key if json.loads(key[1]).get("alora_invocation_tokens") else None


def _load_block(block: list[_Member], kwargs):
    """The base model with the block's adapters, each under its member's adapter name."""
    from csp_utils.vlm import models

    first = block[0].spec
    model, processor = models.load_vlm(first.base_model, adapter=first.adapter, **kwargs)
    for m in block[1:]:
        models.add_adapter(model, m.spec.adapter, m.adapter)
    return model, processor


def model_kwargs(load_kwargs: dict | None) -> dict:
    """The notebooks' load keywords for ``models.load_vlm``: None values dropped, a dtype name
    (other than "auto") turned into the torch dtype."""
    import torch

    kwargs = {k: v for k, v in (load_kwargs or {}).items() if v is not None}
    if isinstance(kwargs.get("dtype"), str) and kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    return kwargs


def answer_key(spec: ModelSpec, cfg) -> tuple | None:
    """What decides a confidence-only adapter's answer turn beyond the evaluation config it
    shares with the other models of one call: the base model and the PEFT config (which
    modules are wrapped shapes the float path even with the adapter disabled, so the base
    model's own rows can differ in the last bits and are never used). None for any other model."""
    if spec.adapter is None or cfg.adapter_scope != "confidence":
        return None
    peft_config = json.loads((Path(spec.adapter) / "adapter_config.json").read_text())
    return spec.base_model, json.dumps(peft_config, sort_keys=True)


def load_rows(results_dir) -> list[dict]:
    from csp_utils.evaluate import evaluation

    rows = []
    for path in sorted(Path(results_dir).glob("*/*.jsonl")):
        rows += evaluation.load_results(path)
    return rows


def save_json(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))
    return path


# ------------------------------------------------------------- notebook conveniences
def results_suffix(results: str) -> str:
    """File-name suffix of an evaluation's own figures: "" for "results", "_noconf" for "results/noconf"."""
    parts = Path(results).parts
    return "" if parts == ("results",) else "_" + "_".join(parts[1:] if parts[0] == "results" else parts)


def model_names(entries) -> list[str]:
    """The names results carry: ``"LABEL=ADAPTER"`` entries are reported as LABEL."""
    return [str(e).split("=", 1)[0] for e in entries]


def model_specs(run_dir, base_model: str, names) -> list[ModelSpec]:
    """``"base"`` is the base model itself; any other name is the adapter ``adapters/<name>``,
    reported under that name, or ``"LABEL=ADAPTER"``: the adapter ``adapters/ADAPTER`` reported
    as LABEL (e.g. ``"grounded@s0=sft@g0"``: one SFT stage's adapter, named for its method)."""
    specs = []
    for entry in names:
        name, _, folder = str(entry).partition("=")
        if not name or (_ and not folder):
            raise ValueError(f"model entry {entry!r}: expected NAME or LABEL=ADAPTER")
        if name == "base" and not folder:
            specs.append(ModelSpec("base", base_model, None))
            continue
        adapter = Path(run_dir) / "adapters" / (folder or name)
        if not (adapter / "adapter_config.json").exists():
            raise FileNotFoundError(f"model {name!r}: no PEFT adapter at {adapter}; run the training notebooks first")
        specs.append(ModelSpec(name, base_model, str(adapter)))
    return specs


# ---------------------------------------------------------------------- baselines
BASELINES = ("constant", "answer_constant", "internal", "temperature")


def baseline_rows(rows: list[dict], base: str = "base", calibration_set: str = "calibration",
                  train_set: str = "train-sample", framing: str = "third", readout: str = "single_pass") -> list[dict]:
    """Rows of the baselines that plant nothing, on the base model's own answers.

    Answers are the base model's, so accuracy is the base's; only the confidence differs:
    ``constant`` (its accuracy on its training questions), ``answer_constant`` (that accuracy
    given its own answer: one value after "yes", one after "no"; an answer without training
    rows of its own, or one that is neither, gets the overall training accuracy),
    ``internal`` (its yes/no token probability), ``temperature`` (that probability scaled,
    T fitted on the calibration set).
    """
    own = [r for r in rows if r["model"] == base and r["framing"] == framing and r["readout"] == readout]
    train = [r for r in own if r["set"] == train_set]
    calib = [r for r in own if r["set"] == calibration_set and r["internal_prob"] is not None]
    if not train or not calib:
        raise ValueError(f"baselines need the {base!r} model's rows on {train_set!r} and {calibration_set!r}")
    train_acc = float(np.mean([r["correct"] for r in train]))
    by_answer = baselines.answer_conditioned_accuracy([r["answer"] for r in train], [r["correct"] for r in train])
    temperature = baselines.fit_temperature([r["internal_prob"] for r in calib], [r["correct"] for r in calib])
    out = []
    for r in own:
        if r["set"] in (train_set, calibration_set):
            continue
        p = r["internal_prob"]
        answer = str(r["answer"]).strip().lower()
        confs = {"constant": (train_acc, {"train_accuracy": train_acc}),
                 "answer_constant": (by_answer.get(answer, train_acc),
                                     {"train_accuracy_given_" + k: v for k, v in by_answer.items()}),
                 "internal": (p, {"temperature": 1.0}),
                 "temperature": (None if p is None else float(baselines.temperature_scale(p, temperature)),
                                 {"temperature": temperature})}
        for name in BASELINES:
            conf, param = confs[name]
            out.append({**r, "model": f"baseline:{name}", "framing": "-", "readout": "-", "confidence": conf,
                        "raw_confidence": None, "baseline_param": json.dumps(param)})
    return out


def recalibrated_name(model: str, kind: str) -> str:
    """``sft_simpo@s1`` recalibrated by isotonic regression -> ``sft_simpo+isotonic@s1`` (the seed
    stays last, so the seeds of a recalibrated method pool as the method's do)."""
    group, at, seed = model.partition("@")
    return f"{group}+{kind}{at}{seed}"


def recalibrated_rows(rows: list[dict], base: str = "base", calibration_set: str = "calibration",
                      skip_sets=("calibration", "train-sample"), framing: str = "third",
                      readout: str = "single_pass", kinds=baselines.RECALIBRATORS) -> list[dict]:
    """Post-hoc recalibrations, each fitted on the calibration set only and applied to every
    other set: of the ``base`` model's internal probability (``baseline:platt``,
    ``baseline:isotonic``, ``baseline:histogram``) and of every model's verbalized confidence
    at (``framing``, ``readout``) (``<model>+<kind>``, fitted on that model's own calibration
    rows). Platt's answer term is the model's own answer being "yes"."""
    own = [r for r in rows if r["framing"] == framing and r["readout"] == readout
           and not str(r["model"]).startswith("baseline:")]
    sources = {}   # output name -> (rows of one model, the confidence it recalibrates)
    for r in own:
        sources.setdefault(str(r["model"]), []).append(r)
    out = []
    for model, rs in sources.items():
        fields = [("confidence", model)] + ([("internal_prob", "baseline")] if model == base else [])
        for field, owner in fields:
            calib = [r for r in rs if r["set"] == calibration_set and r.get(field) is not None]
            if not calib:
                continue
            yes = lambda rr: [str(r["answer"]).strip().lower() == "yes" for r in rr]  # noqa: E731
            for kind in kinds:
                fit = baselines.fit_recalibrator(kind, [r[field] for r in calib], [r["correct"] for r in calib],
                                                 yes(calib))
                name = f"baseline:{kind}" if owner == "baseline" else recalibrated_name(model, kind)
                param = json.dumps({"recalibrates": f"{model}.{field}", "fitted_on": calibration_set,
                                    "n_fit": len(calib)} | fit.params())
                scored = [r for r in rs if r["set"] not in skip_sets]
                raw = np.array([np.nan if r.get(field) is None else r[field] for r in scored], dtype=float)
                confs = fit.apply(np.nan_to_num(raw, nan=0.5), yes(scored))
                extra = {"framing": "-", "readout": "-"} if owner == "baseline" else {}
                out += [{**r, "model": name, **extra, "confidence": None if np.isnan(x) else float(c),
                         "raw_confidence": None, "baseline_param": param} for r, x, c in zip(scored, raw, confs)]
    return out
