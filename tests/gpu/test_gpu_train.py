"""The GPU presets' numerics on the tiny model, on a real GPU (skipped without CUDA; run on every CUDA machine).

* The T4 preset's shape, one process: nf4 base on CUDA, fp16 autocast + GradScaler, the vision tower and norms in
  fp32, grad_accum > 1 with an epoch tail. The loss must fall like the same run's fp32 counterpart.
* bf16 autocast (the A100 preset's dtype) where the GPU has native bf16.
* DeepSpeed ZeRO-2 across two GPUs through Ray Train with fp16 (DeepSpeed's own loss scaling), when two are present.

Figures are printed (``-s``) for the note: first/last loss per dtype, loss scale, skipped steps.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from opsvlm.model import build
from opsvlm.model.build import LoraSettings, ModelConfig
from opsvlm.model.prompt import collate, encode_training_example
from opsvlm.tasks.operations import ClipInput, OperationsTask, target_text
from opsvlm.train.config import OptimSettings
from opsvlm.train.step import Precision, StepRunner, TrainState, make_optimizer, make_scheduler, upcast_trainable

pytestmark = pytest.mark.gpu

CLIPS = [
    ("Picking", 0.0, 2.5, "Relocate Item Label"),
    ("Assemble Box", 1.0, 4.0, "Insert Items"),
    ("Close Box", 0.5, 3.0, "Null"),
    ("Scan Label", 0.0, 4.0, "Fill out Order"),
    ("Picking", 1.0, 3.0, "Null"),
]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def micro_batches(tiny_model_dir) -> list[dict]:
    processor = build.load_processor(str(tiny_model_dir))
    rng = np.random.default_rng(0)
    out = []
    for clip in CLIPS:
        frames = rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
        example = encode_training_example(
            processor, OperationsTask(), ClipInput(frames, [0.0, 1.3, 2.6, 3.9], 4.0), target_text(*clip)
        )
        out.append({k: v.cuda() for k, v in collate([example], processor.tokenizer.pad_token_id).items()})
    return out


def train(tiny_model_dir, micro_batches, quantization: str, dtype: str, epochs: int = 4, grad_accum: int = 2):
    """``epochs`` passes over 5 micro-batches with ``grad_accum`` (5 = 2 + 2 + 1: an epoch tail); step losses."""
    config = ModelConfig(
        name=str(tiny_model_dir),
        quantization=quantization,
        compute_dtype=dtype,
        gradient_checkpointing=True,
        lora=LoraSettings(rank=8, alpha=16, dropout=0.05, targets="language", modules_to_save=("lm_head",)),
    )
    torch.manual_seed(0)
    device_map = {"": 0}
    base = build.load_base_model(config, device_map=device_map)
    model, report = build.prepare_for_training(base, config, device_map=device_map)
    model.cuda()
    upcast_trainable(model)
    steps_per_epoch = math.ceil(len(micro_batches) / grad_accum)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], OptimSettings(lr=2e-3))
    scheduler = make_scheduler(optimizer, 0.0, epochs * steps_per_epoch)
    runner = StepRunner(model, optimizer, scheduler, Precision.for_run("cuda", DTYPES[dtype]), grad_clip=1.0)
    state, losses = TrainState(), []
    for _ in range(epochs):
        for start in range(0, len(micro_batches), grad_accum):
            chunk = micro_batches[start : start + grad_accum]
            losses.append(runner.train_step(((b, None) for b in chunk), [1] * len(chunk), state).loss)
    assert state.step == epochs * steps_per_epoch
    return losses, state, runner, report


def test_t4_preset_shape_nf4_fp16_with_loss_scaling(tiny_model_dir, micro_batches) -> None:
    fp16, state16, runner16, report = train(tiny_model_dir, micro_batches, "nf4", "float16")
    fp32, _, runner32, _ = train(tiny_model_dir, micro_batches, "nf4", "float32")
    print(
        f"\nnf4 fp16: first {fp16[0]:.4f} last {fp16[-1]:.4f} scale {runner16.loss_scale} skipped "
        f"{state16.skipped_steps}; nf4 fp32: first {fp32[0]:.4f} last {fp32[-1]:.4f}"
    )
    assert report["compute_dtype"] == "float16" and report["fp32_modules"] > 0
    assert runner16.loss_scale is not None and runner32.loss_scale is None
    finite = [x for x in fp16 if math.isfinite(x)]
    assert len(finite) >= len(fp16) - state16.skipped_steps
    assert state16.skipped_steps <= 2  # the scale may settle once or twice, no more on this model
    assert fp16[-1] < 0.8 * fp16[0] and fp32[-1] < 0.8 * fp32[0]
    assert fp16[-1] == pytest.approx(fp32[-1], rel=0.05)


def test_bf16_autocast_where_native(tiny_model_dir, micro_batches) -> None:
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no native bf16 (compute capability < 8.0)")
    bf16, state, runner, _ = train(tiny_model_dir, micro_batches, "none", "bfloat16")
    print(f"\nbf16: first {bf16[0]:.4f} last {bf16[-1]:.4f}")
    assert runner.loss_scale is None and state.skipped_steps == 0
    assert all(math.isfinite(x) for x in bf16) and bf16[-1] < 0.8 * bf16[0]


@pytest.mark.integration
def test_zero2_fp16_across_two_gpus(ray_local, mlflow_server, prepared_clips, tiny_model_dir, tmp_path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from opsvlm.train.config import DataSettings, ScalingSettings, TrackingSettings, TrainConfig
    from opsvlm.train.loop import fit

    config = TrainConfig(
        model=ModelConfig(
            name=str(tiny_model_dir),
            quantization="none",
            compute_dtype="float16",
            fp32_modules=(),  # DeepSpeed fp16 casts the whole model
            lora=LoraSettings(rank=8, alpha=16, dropout=0.0, targets="language_vision"),
        ),
        data=DataSettings(prepared=str(prepared_clips)),
        optim=OptimSettings(lr=2e-3, micro_batch=1, grad_accum=3, epochs=2),
        scaling=ScalingSettings(num_workers=2, use_gpu=True, cpus_per_worker=1, zero_stage=2),
        tracking=TrackingSettings(tracking_uri=mlflow_server, experiment="gpu-zero2"),
        checkpoint_every_steps=2,
        storage_path=str(tmp_path / "ray"),
    )
    result = fit(config)
    print(f"\nZeRO-2 fp16 x2: {result.metrics}")
    assert result.steps == result.metrics["planned_steps"]
    assert result.metrics["loss_scale"] > 0
