"""Each method at each scale: what ``make_configs(preset, method=m)`` resolves to is DESIGN.md's
preset x method table, a recipe holds nothing that depends on the model's size, and no method
trains a preset faster than the preset's own rate unless tuned on that preset."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from csp_utils.train import methods, settings

DESIGN = (Path(__file__).resolve().parents[1] / "DESIGN.md").read_text()
PRESETS = tuple(settings.PRESETS)
LORA_LAYERS = {"all-linear": "all-linear", ("q_proj", "k_proj", "v_proj", "o_proj"): "q k v o"}


def _table() -> dict[tuple[str, str], list[str]]:
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \|(.*)\|$", DESIGN, re.M)
    return {(preset, method): [c.strip() for c in rest.split("|")] for preset, method, rest in rows
            if preset in PRESETS}


def _steps(stage) -> str:
    if stage.max_steps > 0:
        return str(stage.max_steps)
    return f"{stage.num_train_epochs:g} epoch" + ("" if stage.num_train_epochs == 1 else "s")


def _resolved(preset: str, method: str) -> list[str]:
    configs = settings.make_configs(preset, method=method)
    sft, simpo = configs.sft, configs.simpo
    stage = lambda c: [f"{c.learning_rate:.0e}".replace("e-0", "e-"), _steps(c),  # noqa: E731
                       f"{c.per_device_train_batch_size}×{c.gradient_accumulation_steps}"]
    simpo_cells = stage(simpo) if methods.method(method).reports_as == "sft_simpo" else ["–"] * 3
    return stage(sft) + simpo_cells + [sft.dtype, LORA_LAYERS[sft.lora.target_modules]]


def test_the_table_has_every_preset_and_method():
    assert set(_table()) == {(p, m) for p in PRESETS for m in methods.METHODS}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_make_configs_is_the_design_table(preset, method):
    assert _resolved(preset, method) == _table()[(preset, method)]


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_a_rate_above_the_presets_is_only_where_the_method_was_tuned(method):
    for preset in PRESETS:
        alone = settings.make_configs(preset)
        configs = settings.make_configs(preset, method=method)
        if preset not in methods.method(method).tuned:
            assert configs.sft.learning_rate == alone.sft.learning_rate
            assert configs.simpo.learning_rate == alone.simpo.learning_rate
            assert (configs.sft.max_steps, configs.simpo.max_steps) == (alone.sft.max_steps, alone.simpo.max_steps)


def test_every_tuned_preset_exists():
    assert all(set(m.tuned) <= set(settings.PRESETS) for m in methods.METHODS.values())
    with pytest.raises(ValueError, match="preset must be one of"):
        settings.make_configs("no_such_preset", method="grounded_csp")


def test_a_recipe_that_sets_a_size_dependent_field_is_refused():
    with pytest.raises(ValueError, match=r"\['learning_rate'\] depend on the model's size"):
        methods.Method(sft={"learning_rate": 5e-3})
    with pytest.raises(ValueError, match=r"lora.target_modules"):
        methods.Method(sft={"lora": {"target_modules": ("q_proj",)}})
    with pytest.raises(ValueError, match="Method.tuned holds only"):
        methods.Method(tuned={"tiny_default": {"sft": {"layout": "inline"}}})
