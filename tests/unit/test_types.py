"""The Literal choice types: the loader and ``check_choices`` enforce them with messages naming the field, and the
tables keyed by a choice (GPU specs, optimizer state sizes, LoRA presets, weighting schemes) hold exactly its values."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from opsvlm.config import ConfigError, check_choices, load_config
from opsvlm.model.plan import GPUS, LORA_TARGET_PRESETS, OPTIMIZER_STATE_BYTES
from opsvlm.train.weighting import WEIGHT_SCHEMES
from opsvlm.types import (
    CLASS_WEIGHTINGS,
    GPU_NAMES,
    LORA_TARGET_PRESET_NAMES,
    OPTIMIZERS,
    Fp32ModuleGroup,
    Optimizer,
    ZeroStage,
)


@dataclass(frozen=True)
class Example:
    optimizer: Optimizer = "adamw"
    zero_stage: ZeroStage = 0
    groups: tuple[Fp32ModuleGroup, ...] | None = None

    def __post_init__(self) -> None:
        check_choices(self, "example.")


def test_tables_keyed_by_a_choice_hold_exactly_its_values() -> None:
    assert tuple(GPUS) == GPU_NAMES
    assert tuple(OPTIMIZER_STATE_BYTES) == OPTIMIZERS
    assert tuple(LORA_TARGET_PRESETS) == LORA_TARGET_PRESET_NAMES
    assert tuple(WEIGHT_SCHEMES) == CLASS_WEIGHTINGS


def test_loader_checks_choices_naming_the_field() -> None:
    assert load_config(Example, None, ["optimizer=adamw_8bit", "zero_stage=2", "groups=[vision]"]) == Example(
        "adamw_8bit", 2, ("vision",)
    )
    with pytest.raises(ConfigError, match=r"optimizer: must be one of \['adamw', 'adamw_8bit', 'paged_adamw_8bit'\]"):
        load_config(Example, None, ["optimizer=sgd"])
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(Example, None, ["zero_stage=1"])
    with pytest.raises(ConfigError, match=r"groups\[1\]"):
        load_config(Example, None, ["groups=[vision, heads]"])


def test_a_bool_is_not_an_int_choice() -> None:
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(Example, None, ["zero_stage=false"])  # False == 0, but it is not the stage 0


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"example\.optimizer: must be one of"):
        Example(optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"example\.groups"):
        Example(groups=("vision", "heads"))  # type: ignore[arg-type]
    Example(groups=None)


def test_flags_become_overrides_that_key_value_overrides_beat() -> None:
    from opsvlm.config import flag_overrides

    @dataclass(frozen=True)
    class Job:
        source: str = ""
        out: str = ""
        optimizer: Optimizer = "adamw"

    overrides = flag_overrides({"source": "123", "out": None, "optimizer": "adamw_8bit"}, ["optimizer=adamw"])
    assert overrides == ['source="123"', 'optimizer="adamw_8bit"', "optimizer=adamw"]
    assert load_config(Job, None, overrides) == Job(source="123", optimizer="adamw")  # a numeric path stays a string
