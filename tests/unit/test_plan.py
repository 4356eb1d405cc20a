"""The memory planner: exact parameter counts against the real transformers classes on the meta device, LoRA counts
against peft, the direction of every memory knob, the rejections, the CLI and reading a local config.json."""

from __future__ import annotations

import importlib.util
import json
import os
from functools import cache
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the planner never needs the hub; make sure the test does not either

import pytest

from opsvlm.model.plan import (
    GPUS,
    KNOWN_MODELS,
    LORA_TARGET_PRESETS,
    ModelArch,
    PlanError,
    PlanInputs,
    count_parameters,
    format_plan,
    grad_accum_for,
    linear_modules,
    load_model_config,
    lora_trainable_params,
    peak_report,
    plan_memory,
    resolve_gpu,
    vision_grid,
)

JOBS_PLAN = Path(__file__).resolve().parents[2] / "jobs" / "plan.py"
QWEN25_3B = "Qwen/Qwen2.5-VL-3B-Instruct"
QWEN25_7B = "Qwen/Qwen2.5-VL-7B-Instruct"
QWEN2_2B = "Qwen/Qwen2-VL-2B-Instruct"


@cache
def meta_model(model: str):
    """The real transformers model for a shipped config, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    config = load_model_config(model)
    if config["model_type"] == "qwen2_5_vl":
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    else:
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    with torch.device("meta"):
        return model_cls(config_cls.from_dict(config))


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- parameter counts ------------------------------------------------------------------------------------------------

# Published sizes (hub model cards / Qwen reports) the shipped configs must reproduce.
REFERENCE_TOTALS = {
    QWEN2_2B: 2.21e9,
    "Qwen/Qwen2-VL-7B-Instruct": 8.29e9,
    QWEN25_3B: 3.75e9,
    QWEN25_7B: 8.29e9,
    "Qwen/Qwen2.5-VL-32B-Instruct": 33.5e9,
    "Qwen/Qwen2.5-VL-72B-Instruct": 73.4e9,
}


@pytest.mark.parametrize("model", [QWEN2_2B, QWEN25_3B, QWEN25_7B])
def test_analytic_counts_equal_meta_device_model(model):
    real = meta_model(model)
    counts = count_parameters(ModelArch.from_config(load_model_config(model)))
    assert counts.total == numel(real)
    assert counts.vision == numel(real.model.visual)
    assert counts.language == numel(real.model.language_model)
    tied = real.lm_head.weight is real.model.language_model.embed_tokens.weight
    assert counts.lm_head == (0 if tied else real.lm_head.weight.numel())


def test_linear_module_paths_are_the_real_ones():
    import torch.nn as nn

    for model in (QWEN2_2B, QWEN25_3B):
        real = {name: mod for name, mod in meta_model(model).named_modules() if isinstance(mod, nn.Linear)}
        ours = {spec.path: spec for spec in linear_modules(ModelArch.from_config(load_model_config(model)))}
        assert set(real) == set(ours)
        for path, spec in ours.items():
            assert (real[path].in_features, real[path].out_features) == (spec.in_features, spec.out_features)
            assert (real[path].bias is not None) == spec.bias


@pytest.mark.parametrize("model", list(KNOWN_MODELS))
def test_shipped_configs_reproduce_published_sizes(model):
    total = count_parameters(ModelArch.from_config(load_model_config(model))).total
    assert total == pytest.approx(REFERENCE_TOTALS[model], rel=0.005)


def test_known_tie_settings():
    assert ModelArch.from_config(load_model_config(QWEN25_3B)).tie_word_embeddings
    assert not ModelArch.from_config(load_model_config(QWEN25_7B)).tie_word_embeddings


# --- LoRA ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [QWEN25_3B, QWEN2_2B])
@pytest.mark.parametrize("preset", ["language", "language_vision"])
def test_lora_trainable_count_matches_peft(model, preset):
    import torch
    from peft import LoraConfig, get_peft_model

    meta_model.cache_clear()  # get_peft_model mutates the model; build a fresh one
    real = meta_model(model)
    with torch.device("meta"):
        peft_model = get_peft_model(real, LoraConfig(r=8, target_modules=LORA_TARGET_PRESETS[preset]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    meta_model.cache_clear()
    arch = ModelArch.from_config(load_model_config(model))
    assert lora_trainable_params(arch, preset, 8) == trainable


def test_lora_count_formula_and_custom_regex():
    arch = ModelArch.from_config(load_model_config(QWEN25_7B))
    h, i, kv = 3584, 18944, 4 * 128
    per_layer = 16 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    assert lora_trainable_params(arch, "language", 16) == 28 * per_layer
    # The brief's loose spelling works as a regex too (re.fullmatch on module paths, like peft).
    loose = r"model.language_model.layers.*.(q|k|v|o|gate|up|down)_proj"
    assert lora_trainable_params(arch, loose, 16) == 28 * per_layer
    only_q = r"model\.language_model\.layers\.\d+\.self_attn\.q_proj"
    assert lora_trainable_params(arch, only_q, 4) == 28 * 4 * (h + h)
    assert lora_trainable_params(arch, "language_vision", 16) > lora_trainable_params(arch, "language", 16)


def test_lora_regex_that_matches_nothing_is_an_error():
    with pytest.raises(PlanError, match="matches no Linear module"):
        plan_memory(PlanInputs(model=QWEN25_3B, gpu="T4", lora_targets=r"model\.nothing\.here"))
    with pytest.raises(PlanError, match="neither a preset"):
        PlanInputs(model=QWEN25_3B, gpu="T4", lora_targets="(unclosed")


# --- visual tokens ---------------------------------------------------------------------------------------------------


def test_visual_tokens_follow_patch_temporal_and_merge():
    arch = ModelArch.from_config(load_model_config(QWEN25_3B))
    grid = vision_grid(arch, frames=8, height=224, width=224)
    assert (grid.patches, grid.tokens) == (4 * 16 * 16, 4 * 16 * 16 // 4)  # (T/2)*(H/14)*(W/14), /4 after merge
    assert vision_grid(arch, frames=7, height=224, width=224).tokens == grid.tokens  # odd T is padded to even
    rounded = vision_grid(arch, frames=2, height=230, width=300)  # processor rounds to multiples of 28
    assert (rounded.height, rounded.width) == (224, 308)
    plan = plan_memory(PlanInputs(model=QWEN25_3B, gpu="T4", frames_per_clip=8, text_tokens=100))
    assert plan.sequence_length == 100 + 256


# --- the memory model's knobs ----------------------------------------------------------------------------------------


def base(**overrides) -> PlanInputs:
    values = {"model": QWEN25_7B, "gpu": "A100-80", "micro_batch": 1, "global_batch": 16}
    values.update(overrides)
    return PlanInputs(**values)


def test_nf4_weights_are_smaller_than_16_bit():
    nf4 = plan_memory(base(quantization="nf4"))
    full = plan_memory(base(quantization="none"))
    assert nf4.breakdown.weights < 0.5 * full.breakdown.weights
    assert full.breakdown.weights == 2 * full.params.total
    # The unquantized rest (vision tower, embeddings, lm_head) stays in 16 bit, so nf4 is well above 4.127 bits.
    assert nf4.breakdown.weights > full.params.total * 4.127 / 8


def test_gradient_checkpointing_reduces_activations():
    on = plan_memory(base(gradient_checkpointing=True))
    off = plan_memory(base(gradient_checkpointing=False))
    assert on.breakdown.activations < 0.5 * off.breakdown.activations
    on_v = plan_memory(base(gradient_checkpointing=True, lora_targets="language_vision"))
    off_v = plan_memory(base(gradient_checkpointing=False, lora_targets="language_vision"))
    assert on_v.breakdown.vision_tokens < off_v.breakdown.vision_tokens


def test_activations_grow_with_frames_resolution_and_micro_batch():
    small = plan_memory(base())
    assert plan_memory(base(frames_per_clip=16)).breakdown.activations > small.breakdown.activations
    assert plan_memory(base(frame_height=448, frame_width=448)).breakdown.vision_tokens > small.breakdown.vision_tokens
    assert plan_memory(base(micro_batch=2)).breakdown.activations > small.breakdown.activations


def test_training_the_vision_tower_costs_vision_activations():
    frozen = plan_memory(base(lora_targets="language"))
    trained = plan_memory(base(lora_targets="language_vision"))
    assert trained.breakdown.vision_tokens > 2 * frozen.breakdown.vision_tokens


def test_zero2_optimizer_bytes_per_gpu_shrink_with_more_gpus():
    per_gpu = [
        plan_memory(base(quantization="none", zero_stage=2, num_gpus=n)).breakdown.optimizer_states
        for n in (1, 2, 4, 8)
    ]
    assert per_gpu == sorted(per_gpu, reverse=True) and len(set(per_gpu)) == 4
    assert per_gpu[0] == pytest.approx(4 * per_gpu[2], rel=1e-6)
    ddp = [plan_memory(base(quantization="none", zero_stage=0, num_gpus=n)).breakdown.optimizer_states for n in (1, 4)]
    assert ddp[0] == ddp[1]  # without ZeRO every GPU holds all states


def test_zero3_shards_weights():
    one = plan_memory(base(quantization="none", zero_stage=3, num_gpus=1)).breakdown.weights
    eight = plan_memory(base(quantization="none", zero_stage=3, num_gpus=8)).breakdown.weights
    assert eight < one / 4


def test_8bit_optimizer_is_a_quarter_of_adamw():
    adamw = plan_memory(base(optimizer="adamw")).breakdown.optimizer_states
    assert plan_memory(base(optimizer="paged_adamw_8bit")).breakdown.optimizer_states * 4 == adamw
    assert plan_memory(base(optimizer="adamw_8bit")).breakdown.optimizer_states * 4 == adamw


# --- fitting and recommendation --------------------------------------------------------------------------------------


def test_72b_unquantized_on_t4_does_not_fit():
    plan = plan_memory(PlanInputs(model="Qwen/Qwen2.5-VL-72B-Instruct", gpu="T4", quantization="none"))
    assert not plan.fits
    assert plan.max_micro_batch == 0 and plan.recommended_micro_batch is None
    assert plan.micro_batch == 1  # the refusal shows the smallest possible footprint
    assert "DOES NOT FIT" in format_plan(plan)
    data = plan.to_dict()
    assert data["fits"] is False and data["recommendation"]["micro_batch"] is None
    assert data["bytes"]["total"] > data["gpu_bytes"]


def test_qlora_3b_on_t4_fits_and_recommends():
    plan = plan_memory(PlanInputs(model=QWEN25_3B, gpu="T4", quantization="nf4", global_batch=16))
    assert plan.fits and plan.compute_dtype == "fp16"
    m, accum = plan.recommended_micro_batch, plan.recommended_grad_accum
    assert 1 <= m <= plan.max_micro_batch
    assert accum == grad_accum_for(16, m, 1) and m * accum >= 16
    assert plan.total_bytes <= plan.usable_bytes
    # One more than the largest fitting micro-batch must not fit (when the batch share allows a larger one).
    if plan.max_micro_batch < 16:
        bigger = plan_memory(PlanInputs(model=QWEN25_3B, gpu="T4", micro_batch=plan.max_micro_batch + 1))
        assert not bigger.fits


def test_requested_micro_batch_is_evaluated_as_given():
    plan = plan_memory(PlanInputs(model=QWEN25_3B, gpu="T4", micro_batch=64, global_batch=64))
    assert plan.micro_batch == 64 and not plan.fits
    assert plan.recommended_micro_batch is not None and plan.recommended_micro_batch < 64


def test_grad_accum_rounds_up():
    assert grad_accum_for(32, 4, 2) == 4
    assert grad_accum_for(30, 4, 2) == 4
    assert grad_accum_for(8, 16, 1) == 1


# --- validation ------------------------------------------------------------------------------------------------------


def test_zero3_with_nf4_is_rejected_up_front():
    with pytest.raises(PlanError, match="ZeRO-3"):
        PlanInputs(model=QWEN25_7B, gpu="A100-80", quantization="nf4", zero_stage=3)
    PlanInputs(model=QWEN25_7B, gpu="A100-80", quantization="none", zero_stage=3)  # fine without 4-bit


def test_unknown_gpu_lists_known_ones():
    with pytest.raises(PlanError) as err:
        PlanInputs(model=QWEN25_3B, gpu="RTX-9090")
    for name in GPUS:
        assert name in str(err.value)
    assert resolve_gpu("a100-80gb").name == "A100-80"
    assert resolve_gpu("h100").name == "H100-80"


def test_t4_trains_in_fp16():
    assert PlanInputs(model=QWEN25_3B, gpu="T4").compute_dtype == "fp16"
    assert PlanInputs(model=QWEN25_3B, gpu="L4").compute_dtype == "bf16"
    with pytest.raises(PlanError, match="bf16"):
        PlanInputs(model=QWEN25_3B, gpu="T4", dtype="bf16")


@pytest.mark.parametrize(
    "overrides",
    [
        {"quantization": "int3"},
        {"optimizer": "sgd"},
        {"zero_stage": 1},
        {"lora_rank": 0},
        {"frames_per_clip": 0},
        {"micro_batch": 0},
        {"num_gpus": 0},
        {"lora_dropout": 1.0},
        {"safety_margin": 0.95},
    ],
)
def test_invalid_inputs_are_rejected(overrides):
    with pytest.raises(PlanError):
        PlanInputs(model=QWEN25_3B, gpu="T4", **overrides)


# --- config resolution -----------------------------------------------------------------------------------------------


def test_local_config_directory_is_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(load_model_config(QWEN25_3B)))
    local = plan_memory(PlanInputs(model=str(tmp_path), gpu="T4"))
    known = plan_memory(PlanInputs(model=QWEN25_3B, gpu="T4"))
    assert local.params == known.params and local.breakdown == known.breakdown


def test_config_saved_by_current_transformers_is_read(tmp_path):
    """A config.json written by transformers 5.x (nested text_config) counts like the model transformers builds."""
    meta_model(QWEN25_3B).config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "text_config" in saved
    arch = ModelArch.from_config(load_model_config(str(tmp_path)))
    assert count_parameters(arch).total == numel(meta_model(QWEN25_3B))


def test_unresolvable_model_says_what_was_tried(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(PlanError, match="not a known hub id") as err:
        load_model_config(str(missing))
    assert str(missing) in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlanError, match=r"no config\.json"):
        load_model_config(str(tmp_path / "empty"))
    assert load_model_config("qwen2.5-vl-3b-instruct")["hidden_size"] == 2048  # bare name, any case


def test_non_qwen_vl_config_is_rejected():
    with pytest.raises(PlanError, match="unsupported model_type"):
        ModelArch.from_config({"model_type": "llama", "hidden_size": 4096})


# --- CLI and reporting -----------------------------------------------------------------------------------------------


def load_cli():
    spec = importlib.util.spec_from_file_location("jobs_plan", JOBS_PLAN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_prints_one_json_object(capsys):
    cli = load_cli()
    code = cli.main(["--model", QWEN25_3B, "--gpu", "T4", "frames_per_clip=8", "gradient_checkpointing=true"])
    out = capsys.readouterr().out
    data = json.loads(out)
    assert code == 0
    for key in ("total_params", "trainable_params", "bytes", "recommendation", "fits", "gpu_bytes", "micro_batch"):
        assert key in data
    for component in ("weights", "adapters", "gradients", "optimizer_states", "activations", "vision_tokens"):
        assert data["bytes"][component] >= 0
    assert data["total_params"] == numel(meta_model(QWEN25_3B))
    assert data["recommendation"]["grad_accum"] >= 1


def test_cli_errors_go_to_stderr(capsys):
    cli = load_cli()
    assert cli.main(["--model", QWEN25_7B, "--gpu", "T4", "zero_stage=3"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "ZeRO-3" in captured.err
    assert cli.main(["--model", QWEN25_7B, "--gpu", "T4", "no_such_setting=1"]) == 2
    assert "unknown key(s) ['no_such_setting']" in capsys.readouterr().err
    assert cli.main(["--model", QWEN25_7B, "--gpu", "T4", "optimizer=sgd"]) == 2
    assert "optimizer: must be one of ['adamw', 'adamw_8bit', 'paged_adamw_8bit']" in capsys.readouterr().err
    assert cli.main(["--model", QWEN25_7B, "--gpu", "T4", "gpu=L4"]) == 2
    assert "--gpu" in capsys.readouterr().err
    assert cli.main(["--model", "Qwen/Qwen2.5-VL-72B-Instruct", "--gpu", "T4", "quantization=none", "--check"]) == 1
    assert json.loads(capsys.readouterr().out)["fits"] is False


def test_cli_settings_are_config_overrides(capsys):
    """The CLI loads PlanInputs with opsvlm.config.load_config: YAML values, null for "let the planner choose"."""
    cli = load_cli()
    args = ["--model", QWEN25_3B, "--gpu", "a100-80gb", "micro_batch=null", "gradient_checkpointing=false"]
    assert cli.main([*args, "quantization=none", "zero_stage=2", "num_gpus=2", "dtype=bf16"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = plan_memory(
        PlanInputs(
            model=QWEN25_3B,
            gpu="a100-80gb",
            gradient_checkpointing=False,
            quantization="none",
            zero_stage=2,
            num_gpus=2,
            dtype="bf16",
        )
    )
    assert data == json.loads(json.dumps(expected.to_dict()))


def test_peak_report_puts_measurement_next_to_estimate():
    plan = plan_memory(PlanInputs(model=QWEN25_3B, gpu="T4"))
    report = peak_report(plan, plan.total_bytes // 2)
    assert report["estimated_peak_bytes"] == plan.total_bytes
    assert report["measured_over_estimated"] == pytest.approx(0.5, abs=1e-3)
