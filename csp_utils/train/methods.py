"""The study's methods, each defined once: what its dataset is built with (notebook 02's
``build``) and what its training stages are set to (notebook 03's ``sft``, notebook 04's
``simpo``), over the hardware preset (:mod:`csp_utils.train.settings`). A notebook run alone
with ``method=NAME`` trains what the README reports under that name; params name a method and
override only what differs. A method's recipe holds no setting that depends on the model's size
(:data:`SCALED_FIELDS`): those are the preset's, or given in ``Method.tuned`` for the preset
they were tuned on (DESIGN.md, "Methods and params", has the table per preset).

* ``paper_csp``: the paper's recipe: targets from the noise level on gold-"yes" questions;
  SFT, then SimPO. On the embedded model SFT 400 steps of 16 rows (about 0.7 epoch of a
  400-scene dataset), then SimPO 250 steps of 8 pairs.
* ``grounded_csp``: grounded rows (the base model's own answers to the clean sets' kinds of
  question, ``questions="benchmark"``) with target ``correct`` (the answer's own correctness),
  the confidence read right after the answer in the same reply (``inline``), option soft-CE
  (on the embedded model 600 steps at 5e-3); adapters on the confidence turn only. Every row clean (``clean_share``
  1.0): on a validation split, rows noised on the asked object or a distractor (levels 10, 40,
  70, 100 when ``clean_share`` < 1) did not help the ranking within a set
  (docs/grounded.md, "Learning curve"). No flipped rows.
* ``distilled``: grounded CSP's rows and training with the base model's temperature-scaled
  internal probability as target: the reference that knows what the model's own
  probability knows.
* ``distilled_activated``: the distilled target asked in a follow-up turn by an activated
  adapter (PEFT's aLoRA), which acts only from the confidence question on, so the confidence
  positions attend to the answer's states as the base model computed them. On a base whose
  answer position holds its evidence below the last layer (``embedded-deep``) this is the one
  recipe that ranks the model's own answers within a set on the validation split; on the
  3-layer bases the evidence forms in the last layer, out of reach (docs/grounded.md, fourth
  round). Its loss is the cross-entropy to the binomial the target implies over the eleven
  options (``binomial_ce``): three-seed validation within-set AUROC 0.731 against soft-CE's
  0.723 (docs/grounded.md, fifth round).
* ``calibrated_activated``: ``distilled_activated``'s training on rows of which half are noised
  by CSP (the whole image, the asked object or a distractor, levels 10/40/70), each with the
  ``calibrated`` target: the probability that the base model's answer on *that* image is right,
  given its own probability and the perturbation (a logistic model fitted on held-out training
  scenes). The confidence turn must read the degradation from the image: no level is given at
  test time (docs/grounded.md, fifth round).
"""

from __future__ import annotations

from dataclasses import dataclass, field



# What depends on the model's size: the hardware preset's (settings.tiny_default,
# settings.paper_llava7b), never a method's own. A method that was tuned on one preset gives
# these for that preset by name (Method.tuned); on any other preset the preset's values hold.
SCALED_FIELDS = ("learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "dtype", "mixed_precision", "gradient_checkpointing",
                 "dataloader_num_workers", "trl_fused_loss")
SCALED_LORA_FIELDS = ("target_modules", "target_parts")  # the layers' names are the architecture's


@dataclass(frozen=True)
class Method:
    build: dict = field(default_factory=dict)   # BuildConfig fields of its dataset
    sft: dict = field(default_factory=dict)     # SFTConfigCSP fields, none of SCALED_FIELDS
    simpo: dict = field(default_factory=dict)   # SimPOConfigCSP fields (methods with a SimPO stage), likewise
    # preset name -> {"sft": {...}, "simpo": {...}}: SCALED_FIELDS as tuned on that preset
    tuned: dict = field(default_factory=dict)
    reports_as: str = ""                        # the model group its adapters are reported under

    def __post_init__(self):
        for stage in ("sft", "simpo"):
            fields = getattr(self, stage)
            scaled = [k for k in fields if k in SCALED_FIELDS]
            scaled += [f"lora.{k}" for k in fields.get("lora", {}) if k in SCALED_LORA_FIELDS]
            if scaled:
                raise ValueError(f"{stage} {scaled} depend on the model's size: give them in Method.tuned "
                                 "for the preset they were tuned on")
        for preset, stages in self.tuned.items():
            extra = [f"{preset}.{stage}.{k}" for stage, fields in stages.items() for k in fields
                     if stage not in ("sft", "simpo") or k not in SCALED_FIELDS]
            if extra:
                raise ValueError(f"Method.tuned holds only {SCALED_FIELDS} per stage, got {extra}")

    def stage_layers(self, preset: str) -> list[tuple[dict, dict]]:
        """(sft, simpo) changes over ``preset``: the recipe, then what was tuned on that preset."""
        tuned = self.tuned.get(preset, {})
        return [(self.sft, self.simpo), (tuned.get("sft", {}), tuned.get("simpo", {}))]


# Steps and rates were tuned on the embedded model (tiny_default); on paper_llava7b each stage
# runs the preset's one epoch at the preset's rate.
PAPER_CSP = Method(tuned={"tiny_default": {"sft": {"max_steps": 400}, "simpo": {"max_steps": 250}}},
                   reports_as="sft_simpo")
GROUNDED_CSP = Method(
    build={"targets": "grounded", "levels": (10, 40, 70, 100)},  # buildconfig.GroundedOptions' defaults
    sft={"confidence_target": "correct", "layout": "inline", "loss": "soft_ce"},
    tuned={"tiny_default": {"sft": {"max_steps": 600, "learning_rate": 5e-3}}},
    reports_as="grounded")
DISTILLED = Method(build=GROUNDED_CSP.build, sft={**GROUNDED_CSP.sft, "confidence_target": "internal"},
                   tuned=GROUNDED_CSP.tuned, reports_as="distilled")
DISTILLED_ACTIVATED = Method(
    build=GROUNDED_CSP.build,
    sft={**DISTILLED.sft, "layout": "follow_up", "lora": {"activation": "confidence"}, "loss": "binomial_ce"},
    # 1,600 steps on 4,800 scenes (params' data): docs/grounded.md, fifth round, "More rows and steps"
    tuned={"tiny_default": {"sft": {**GROUNDED_CSP.tuned["tiny_default"]["sft"], "max_steps": 1600}}},
    reports_as="distilled_activated")
CALIBRATED_ACTIVATED = Method(
    build={**GROUNDED_CSP.build, "grounded": {"clean_share": 0.5, "global_share": 0.5}},
    sft={**DISTILLED_ACTIVATED.sft, "confidence_target": "calibrated"},
    tuned={"tiny_default": {"sft": {**GROUNDED_CSP.tuned["tiny_default"]["sft"], "max_steps": 800}}},
    reports_as="calibrated_activated")
METHODS = {"paper_csp": PAPER_CSP, "grounded_csp": GROUNDED_CSP, "distilled": DISTILLED,
           "distilled_activated": DISTILLED_ACTIVATED, "calibrated_activated": CALIBRATED_ACTIVATED}


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


def build_fields(name: str, build: dict | None = None) -> dict:
    """A method's dataset build fields with ``build`` over them (nested dicts merged)."""
    return deep_merge(method(name).build, build or {})


def deep_merge(base: dict, over: dict) -> dict:
    """``over``'s values over ``base``'s; where both hold a dict, merged the same way."""
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
