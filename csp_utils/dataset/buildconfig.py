"""What a dataset build is set to (:class:`BuildConfig`, with :class:`GroundedOptions` for
grounded rows) and the hash that names a build's config in its ``state.json``: a folder built
with another config is never resumed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from csp_utils.dataset.csp_noise import NoiseConfig, validate_levels
from csp_utils.vlm.prompts import FRAMINGS

FAILURE_POLICIES = ("skip", "global", "clean")
TARGETS = ("paper", "grounded")
QUESTION_SOURCES = ("world", "benchmark")
FORMAT_VERSION = 1  # bump when the row layout or the noise changes: old folders then refuse to resume


@dataclass
class GroundedOptions:
    """How grounded rows are built; the defaults are grounded CSP's recipe (train/methods.py)."""

    clean_share: float = 1.0          # share of each scene's questions kept clean (rounded up per scene)
    flip_rows: bool = False           # add the answer-flip copy of every row
    distractor_noise: bool = True     # False: only key noise; questions whose objects are absent stay clean
    key_share: float = 0.5            # noised questions whose objects are present: share noised on them
    global_share: float = 0.0         # noised questions whose noise covers the whole image (drawn first)
    temperature_holdout: float = 0.2  # share of scenes whose clean rows fit T (marked split="heldout")
    batch_size: int = 128             # questions per model batch
    max_new_tokens: int = 4           # the greedy answer reply
    bright_tolerance: float = 0.03    # bright-scene share: clean may fall at most this far below noised
    questions: str = "benchmark"      # "world" (language.world_questions) | "benchmark" (the clean sets' generators)

    def __post_init__(self):
        for name in ("clean_share", "key_share", "global_share"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"GroundedOptions.{name} must be a fraction in [0, 1], got {v!r}")
        if not 0.0 < self.temperature_holdout < 1.0:
            raise ValueError(f"GroundedOptions.temperature_holdout must be in (0, 1), got {self.temperature_holdout!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("GroundedOptions.batch_size and max_new_tokens must be >= 1")
        if self.questions not in QUESTION_SOURCES:
            raise ValueError(f"GroundedOptions.questions must be one of {QUESTION_SOURCES}, got {self.questions!r}")


@dataclass
class BuildConfig:
    levels: tuple[int, ...] | None = None   # integer percents; None = noise.levels (0, 10, ..., 100)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    framing: str = "third"                  # confidence prompt: "third" (paper) | "first"
    failure_policy: str = "skip"            # grounding failed: "skip" | "global" (whole image) | "clean" (kept at 100%)
    include_negatives: bool = False         # "No" answers: their key objects are absent, nothing to perturb
    shard_size: int = 100                   # source samples per shard (x levels rows)
    seed: int | None = None                 # noise seed; None = noise.seed
    grounder: str = "annotations"           # grounder spec for make_grounder when none is passed
    png_compress_level: int = 1             # noised pixels barely compress: at 512 px level 1 is 3x faster than PIL's 6 for 9% more bytes
    targets: str = "paper"                  # "paper": target = noise level | "grounded": the base model's own answers (grounded)
    grounded: Any = None                    # GroundedOptions (or its dict) when targets == "grounded"

    def __post_init__(self):
        if isinstance(self.noise, dict):  # read back from JSON / YAML
            self.noise = NoiseConfig(**self.noise)
        if self.levels is not None:
            self.levels = validate_levels(self.levels)
        if self.framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {FRAMINGS}, got {self.framing!r}")
        if self.failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"failure_policy must be one of {FAILURE_POLICIES}, got {self.failure_policy!r}")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer, got {self.shard_size!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"targets must be one of {TARGETS}, got {self.targets!r}")
        if self.targets == "paper" and self.grounded is not None:
            raise ValueError("grounded options were given with targets='paper'; set targets='grounded' or drop them")
        if self.targets == "grounded":
            if self.grounded is None or isinstance(self.grounded, dict):
                self.grounded = GroundedOptions(**(self.grounded or {}))

    def effective_noise(self) -> NoiseConfig:
        """The NoiseConfig the build uses: BuildConfig's levels / seed, where given, win."""
        noise = self.noise
        if self.levels is not None:
            noise = replace(noise, levels=self.levels)
        if self.seed is not None:
            noise = replace(noise, seed=self.seed)
        return noise

    def to_dict(self) -> dict:
        d = asdict(self)
        d["noise"] = asdict(self.effective_noise())
        d["levels"], d["seed"] = list(d["noise"]["levels"]), d["noise"]["seed"]
        d["noise"]["levels"] = list(d["noise"]["levels"])
        if self.targets == "paper":  # the paper build's config (and so its hash) stays what it was
            del d["targets"], d["grounded"]
        elif d["grounded"]["global_share"] == 0.0:  # builds without whole-image noise keep their hash
            del d["grounded"]["global_share"]
        return d


def grounder_fingerprint(grounder) -> str:
    """The grounder's name plus the settings that change its masks (thresholds), for the config hash."""
    name = str(getattr(grounder, "name", type(grounder).__name__))
    knobs = [f"{k}={getattr(grounder, k)}" for k in ("box_threshold", "text_threshold", "max_boxes")
             if hasattr(grounder, k)]
    return f"{name}({', '.join(knobs)})" if knobs else name


def config_hash(config: BuildConfig, grounder_name: str) -> str:
    payload = {"format": FORMAT_VERSION, "config": config.to_dict(), "grounder_name": grounder_name}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def options_of(config: BuildConfig) -> GroundedOptions:
    g = config.grounded
    if g is None:
        return GroundedOptions()
    return g if isinstance(g, GroundedOptions) else GroundedOptions(**g)


def noised_levels(config: BuildConfig) -> tuple[int, ...]:
    levels = tuple(c for c in config.effective_noise().levels if c < 100)
    if not levels:
        raise ValueError(f"a grounded build needs at least one level below 100, got {config.effective_noise().levels}")
    return levels
