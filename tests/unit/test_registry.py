"""The model registry on a real MLflow (SQLite store in a temp dir): registration tags, champion/challenger promotion
(first, worse, better, other split, forced), versions never deleted, model references, and ``jobs/promote.py``."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import save_file

from opsvlm import registry
from opsvlm.tasks.operations import LABEL_NAMES
from opsvlm.train import checkpoint as ckpt
from opsvlm.video.sampling import SamplingSpec

JOBS_PROMOTE = Path(__file__).resolve().parents[2] / "jobs" / "promote.py"
SPLIT = "test:ab12cd"
SPEC = SamplingSpec(frames_per_clip=4)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A SQLite tracking store with one experiment; artifacts beside the database (as ``ensure_experiment`` does)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    experiment_id = client.create_experiment("opsvlm", artifact_location=(root / "artifacts").as_uri())
    return {"uri": uri, "client": client, "experiment_id": experiment_id, "root": root}


def write_checkpoint(directory: Path, base_model: str = "tiny") -> Path:
    """A small but valid checkpoint: real model.json format, a loadable adapter, a processor folder."""
    (directory / ckpt.ADAPTER_DIR).mkdir(parents=True)
    save_file({"lora_A.weight": torch.ones(2, 4)}, str(directory / ckpt.ADAPTER_DIR / "adapter_model.safetensors"))
    (directory / ckpt.ADAPTER_DIR / "adapter_config.json").write_text(json.dumps({"r": 2, "peft_type": "LORA"}))
    (directory / ckpt.PROCESSOR_DIR).mkdir()
    (directory / ckpt.PROCESSOR_DIR / "preprocessor_config.json").write_text("{}")
    meta = {
        "format": ckpt.CHECKPOINT_FORMAT,
        "task": "operations",
        "base_model": base_model,
        "quantization": "none",
        "compute_dtype": "float32",
        "sampling_spec": asdict(SPEC),
        "labels": list(LABEL_NAMES),
        "step": 7,
    }
    (directory / ckpt.MODEL_FILE).write_text(json.dumps(meta))
    (directory / ckpt.CONFIG_FILE).write_text("{}")
    return directory


def train_run(store: dict, tmp_path: Path, *, with_checkpoint: bool = True) -> str:
    """A finished 'training' run whose checkpoint is logged under ``checkpoint`` as plain artifacts (like ``fit``)."""
    client = store["client"]
    run_id = client.create_run(store["experiment_id"]).info.run_id
    if with_checkpoint:
        client.log_artifacts(run_id, str(write_checkpoint(tmp_path / f"ckpt-{run_id}")), "checkpoint")
    client.set_terminated(run_id)
    return run_id


def eval_run(store: dict, train_run_id: str, metrics: dict[str, float], split: str = SPLIT) -> str:
    """An 'evaluation' run tagged like ``evaluate/run.py`` does, with a baseline metric that must not be taken."""
    client = store["client"]
    tags = {registry.EVAL_SPLIT_TAG: split, registry.TRAIN_RUN_TAG: train_run_id}
    run_id = client.create_run(store["experiment_id"], tags=tags).info.run_id
    for key, value in {**metrics, "baseline/majority/weighted_score": 0.99}.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id)
    return run_id


def register(store, tmp_path, name, score, split=SPLIT, **extra):
    run_id = train_run(store, tmp_path)
    metrics = {"weighted_score": score, "oca": 0.5, "oca_recall/fill_out_order": 0.25, **extra}
    return registry.register_version(
        run_id, name=name, metrics=metrics, eval_split=split, eval_run_id="e" * 32, tracking_uri=store["uri"]
    )


def champion_of(store, name) -> int:
    return int(store["client"].get_model_version_by_alias(name, registry.CHAMPION).version)


def load_job():
    spec = importlib.util.spec_from_file_location("jobs_promote", JOBS_PROMOTE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- registration ----------------------------------------------------------------------------------------------------


def test_register_version_tags_everything_serving_and_comparison_need(store, tmp_path):
    version = register(store, tmp_path, "tags", 0.5)
    tags = version.tags
    assert version.source == f"runs:/{version.run_id}/checkpoint"
    assert tags["base_model"] == "tiny"
    assert tags["quantization"] == "none"
    assert json.loads(tags["sampling_spec"]) == asdict(SPEC)
    assert json.loads(tags["labels"]) == list(LABEL_NAMES)
    assert tags["task"] == "operations"
    assert tags["processor"] == "checkpoint/processor"
    assert tags["eval_split"] == SPLIT
    assert tags["eval_run_id"] == "e" * 32
    assert float(tags["metric.weighted_score"]) == 0.5
    assert float(tags["metric.oca_recall/fill_out_order"]) == 0.25
    assert int(store["client"].get_model_version_by_alias("tags", registry.CHALLENGER).version) == int(version.version)


def test_register_refuses_a_run_without_checkpoint(store, tmp_path):
    run_id = train_run(store, tmp_path, with_checkpoint=False)
    with pytest.raises(registry.ModelRefError, match=run_id):
        registry.register_version(
            run_id, name="nockpt", metrics={"weighted_score": 0.5}, eval_split=SPLIT, tracking_uri=store["uri"]
        )


# --- promotion -------------------------------------------------------------------------------------------------------


def test_promotion_champion_moves_only_when_strictly_better_on_the_same_split(store, tmp_path):
    name, client = "promo", store["client"]

    first = registry.promote(name, register(store, tmp_path, name, 0.580).version, tracking_uri=store["uri"])
    assert first.promoted and not first.forced and first.previous_champion_version is None
    assert str(first).startswith("PROMOTED v1:") and "no champion" in str(first)
    assert champion_of(store, name) == 1

    worse = registry.promote(name, register(store, tmp_path, name, 0.541).version, tracking_uri=store["uri"])
    assert not worse.promoted
    assert str(worse) == f"KEPT champion v1: challenger v2 0.541 <= 0.580 (split {SPLIT})"
    assert (worse.new_score, worse.champion_score) == (0.541, 0.580)
    assert champion_of(store, name) == 1
    assert int(client.get_model_version_by_alias(name, registry.CHALLENGER).version) == 2
    assert client.get_model_version(name, "2").tags["promotion.decision"] == "kept"

    equal = registry.promote(name, register(store, tmp_path, name, 0.580).version, tracking_uri=store["uri"])
    assert not equal.promoted and "<=" in str(equal)

    better = registry.promote(name, register(store, tmp_path, name, 0.612).version, tracking_uri=store["uri"])
    assert better.promoted and better.previous_champion_version == 1
    assert str(better) == f"PROMOTED v4: weighted_score 0.612 > champion v1 0.580 (split {SPLIT})"
    assert champion_of(store, name) == 4
    tags = client.get_model_version(name, "4").tags
    assert tags["promotion.decision"] == "promoted"
    assert tags["promotion.previous_champion"] == "1"
    assert tags["promotion.forced"] == "false"

    other_split = register(store, tmp_path, name, 0.9, split="test:ffff00")
    kept = registry.promote(name, other_split.version, tracking_uri=store["uri"])
    assert not kept.promoted and "not comparable" in kept.reason
    assert "0.900" in kept.reason and "0.612" in kept.reason
    assert champion_of(store, name) == 4

    forced = registry.promote(name, other_split.version, force=True, tracking_uri=store["uri"])
    assert forced.promoted and forced.forced and str(forced).startswith("PROMOTED v5 (forced):")
    assert champion_of(store, name) == 5
    tags = client.get_model_version(name, "5").tags
    assert tags["promotion.forced"] == "true" and tags["promotion.decision"] == "promoted"
    assert tags["promotion.previous_champion"] == "4"

    again = registry.promote(name, 5, tracking_uri=store["uri"])
    assert not again.promoted and "already the champion" in str(again)

    versions = client.search_model_versions(f"name='{name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4, 5]  # nothing ever deleted


def test_close_scores_print_enough_digits(store, tmp_path):
    name = "close"
    registry.promote(name, register(store, tmp_path, name, 0.6121).version, tracking_uri=store["uri"])
    decision = registry.promote(name, register(store, tmp_path, name, 0.6124).version, tracking_uri=store["uri"])
    assert decision.promoted and "0.6124 > champion v1 0.6121" in str(decision)


# --- references ------------------------------------------------------------------------------------------------------


def test_resolve_model_refs_give_a_readable_checkpoint(store, tmp_path):
    name = "refs"
    version = register(store, tmp_path, name, 0.7)
    registry.promote(name, version.version, tracking_uri=store["uri"])
    run_id = version.run_id
    cache = tmp_path / "cache"

    champion_dir = registry.resolve_model(f"models:/{name}@champion", store["uri"], cache_dir=cache)
    meta = ckpt.read_model_meta(champion_dir)
    assert meta["base_model"] == "tiny" and meta["labels"] == list(LABEL_NAMES)
    assert ckpt.sampling_spec_of(champion_dir) == SPEC
    assert ckpt.verify_adapter(champion_dir) == 1
    assert (champion_dir / ckpt.PROCESSOR_DIR / "preprocessor_config.json").is_file()
    assert registry.resolve_model(f"models:/{name}/1", store["uri"], cache_dir=cache) == champion_dir  # cached

    for ref in (run_id, f"runs:/{run_id}", f"runs:/{run_id}/checkpoint"):
        assert ckpt.read_model_meta(registry.resolve_model(ref, store["uri"]))["step"] == 7
    assert registry.resolve_model(str(champion_dir)) == champion_dir

    described = registry.describe_model(f"models:/{name}@champion", store["uri"])
    assert described == {
        "ref": f"models:/{name}@champion",
        "name": name,
        "version": 1,
        "alias": "champion",
        "run_id": run_id,
        "artifact_path": "checkpoint",
    }
    assert registry.describe_model(run_id, store["uri"])["run_id"] == run_id
    assert "run_id" not in registry.describe_model(str(champion_dir))


def test_bad_refs_name_the_ref(store, tmp_path):
    run_id = register(store, tmp_path, "bad", 0.5).run_id
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    for ref in (
        "not-a-ref",
        "models:/bad@nope",
        "models:/missing/1",
        "runs:/" + "0" * 32,
        "0" * 32,
        f"runs:/{run_id}/nothing",
        f"runs:/{run_id}/checkpoint/adapter",  # exists, but not a checkpoint
        str(empty_dir),
    ):
        with pytest.raises(registry.ModelRefError) as info:
            registry.resolve_model(ref, store["uri"])
        assert repr(ref) in str(info.value), str(info.value)


# --- the job ---------------------------------------------------------------------------------------------------------


def test_job_registers_promotes_and_prints_both_numbers(store, tmp_path, capsys):
    job = load_job()
    name = "job"
    first = train_run(store, tmp_path)
    summary = tmp_path / "eval_summary.json"
    summary.write_text(
        json.dumps(
            {
                "metrics": {"weighted_score": 0.58, "oca": 0.6},
                "eval_split": SPLIT,
                "eval_run_id": "e" * 32,
                "train_run_id": first,
            }
        )
    )
    assert job.main(["--run-id", first, "--metrics", str(summary), "--name", name, "--tracking-uri", store["uri"]]) == 0
    assert "PROMOTED v1" in capsys.readouterr().out

    second = train_run(store, tmp_path)
    evaluation = eval_run(store, second, {"weighted_score": 0.55, "oca": 0.5})
    assert job.main(["--run-id", second, "--metrics", evaluation, "--name", name, "--tracking-uri", store["uri"]]) == 0
    out = capsys.readouterr().out
    assert f"KEPT champion v1: challenger v2 0.550 <= 0.580 (split {SPLIT})" in out
    assert json.loads(out.strip().splitlines()[-1])["promoted"] is False
    tags = store["client"].get_model_version(name, "2").tags
    assert tags["eval_run_id"] == evaluation and "metric.baseline/majority/weighted_score" not in tags

    args = ["--run-id", second, "--metrics", evaluation, "--name", name, "--tracking-uri", store["uri"], "--force"]
    assert job.main(args) == 0
    assert "PROMOTED v3 (forced)" in capsys.readouterr().out
    assert store["client"].get_model_version(name, "3").tags["promotion.forced"] == "true"
    assert len(store["client"].search_model_versions(f"name='{name}'")) == 3

    assert job.main(["--run-id", first, "--metrics", evaluation, "--name", name, "--tracking-uri", store["uri"]]) == 2
    assert f"evaluated run {second}" in capsys.readouterr().err
    assert len(store["client"].search_model_versions(f"name='{name}'")) == 3  # refused before registering
