"""The model registry on a real MLflow (SQLite store in a temp dir): registration tags, champion/challenger promotion
(first, worse, better, other split, forced), versions never deleted, model references, and ``jobs/promote.py``."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import save_file

from opsvlm import registry
from opsvlm.model import checkpoint as ckpt
from opsvlm.tasks.operations import LABEL_NAMES
from opsvlm.video.sampling import SamplingSpec

JOBS_PROMOTE = Path(__file__).resolve().parents[2] / "jobs" / "promote.py"
SPLIT = "val:ab12cd"
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
        client.log_dict(run_id, ckpt.completion_marker(7, list(ckpt.REGISTERED_FILES)), ckpt.COMPLETE_MARKER)
    client.set_terminated(run_id)
    return run_id


def clip_rows(n_sessions: int = 12, per_session: int = 10) -> list[dict]:
    """Label rows of an operations split: sessions of clips, alternating two operations."""
    rows = []
    for s in range(n_sessions):
        for c in range(per_session):
            op = "Picking" if c % 2 else "Close Box"
            rows.append(
                {
                    "clip_id": f"U{s:04d}/S0100/{c:03d}",
                    "subject": f"U{s:04d}",
                    "session": "S0100",
                    "start_s": 2.5 * c,
                    "end_s": 2.5 * c + 5.0,
                    "dominant_operation": op,
                    "temporal_segment": [0.0, 5.0],
                    "next_operation": "Scan Label",
                }
            )
    return rows


def answers_for(rows: list[dict], correct) -> list[dict]:
    """The truth where ``correct`` is set, else a wrong operation and next operation (segment right)."""
    return [
        {"operation": r["dominant_operation"], "start_s": 0.0, "end_s": 5.0, "next_operation": r["next_operation"]}
        if ok
        else {"operation": "Insert Items", "start_s": 0.0, "end_s": 5.0, "next_operation": "Null"}
        for r, ok in zip(rows, correct, strict=True)
    ]


def eval_run(store: dict, train_run_id: str, correct, split: str = SPLIT, role: str = "selection") -> tuple[str, dict]:
    """An evaluation run as ``evaluate/run.py`` stores it: summary and per-example answers, tags, metrics (plus a
    baseline metric that must not be taken for the model's)."""
    from opsvlm.tasks.base import get_task

    task = get_task("operations")
    rows = clip_rows()
    answers = answers_for(rows, correct)
    metrics = task.compute_metrics(rows, answers)
    client = store["client"]
    tags = {registry.EVAL_SPLIT_TAG: split, registry.TRAIN_RUN_TAG: train_run_id, "opsvlm.split_role": role}
    run_id = client.create_run(store["experiment_id"], tags=tags).info.run_id
    for key, value in {"weighted_score": metrics["weighted_score"], "baseline/majority/weighted_score": 0.99}.items():
        client.log_metric(run_id, key, value)
    examples = {
        "task": "operations",
        "eval_split": split,
        "ids": [r["clip_id"] for r in rows],
        "groups": [task.group_of(r) for r in rows],
        "rows": rows,
        "answers": answers,
    }
    summary = {
        "task": "operations",
        "split": split.split(":")[0],
        "role": role,
        "eval_split": split,
        "metrics": metrics,
        "eval_run_id": run_id,
        "train_run_id": train_run_id,
    }
    client.log_dict(run_id, examples, registry.EXAMPLES_ARTIFACT)
    client.log_dict(run_id, summary, registry.SUMMARY_ARTIFACT)
    client.set_terminated(run_id)
    return run_id, summary


def register(store, tmp_path, name, correct, split=SPLIT, role="selection", **metric_overrides):
    run_id = train_run(store, tmp_path)
    eval_id, summary = eval_run(store, run_id, correct, split, role)
    metrics = {**summary["metrics"], **metric_overrides}
    return registry.register_version(
        run_id,
        name=name,
        metrics=metrics,
        eval_split=split,
        split_role=role,
        eval_run_id=eval_id,
        tracking_uri=store["uri"],
    )


def correct_share(share: float, seed: int = 0, n: int = 120):
    """A correctness vector with round(share * n) clips right, spread at random over the sessions."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n, dtype=bool)
    out[rng.choice(n, size=round(share * n), replace=False)] = True
    return out


def champion_of(store, name) -> int:
    return int(store["client"].get_model_version_by_alias(name, registry.CHAMPION).version)


def load_job():
    spec = importlib.util.spec_from_file_location("jobs_promote", JOBS_PROMOTE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- registration ----------------------------------------------------------------------------------------------------


def test_register_version_tags_everything_serving_and_comparison_need(store, tmp_path):
    version = register(store, tmp_path, "tags", correct_share(0.5), **{"oca_recall/fill_out_order": 0.25})
    tags = version.tags
    assert version.source == f"runs:/{version.run_id}/checkpoint"
    assert tags["base_model"] == "tiny"
    assert tags["quantization"] == "none"
    assert json.loads(tags["sampling_spec"]) == asdict(SPEC)
    assert json.loads(tags["labels"]) == list(LABEL_NAMES)
    assert tags["task"] == "operations"
    assert tags["processor"] == "checkpoint/processor"
    assert tags["eval_split"] == SPLIT
    assert len(tags["eval_run_id"]) == 32 and tags["split_role"] == "selection"
    assert float(tags["metric.weighted_score"]) == pytest.approx(0.65)  # half right (1.0), half wrong (0.3)
    assert float(tags["metric.oca_recall/fill_out_order"]) == 0.25
    assert int(store["client"].get_model_version_by_alias("tags", registry.CHALLENGER).version) == int(version.version)


def test_register_refuses_a_run_without_checkpoint(store, tmp_path):
    run_id = train_run(store, tmp_path, with_checkpoint=False)
    with pytest.raises(registry.ModelRefError, match=run_id):
        registry.register_version(
            run_id,
            name="nockpt",
            metrics={"weighted_score": 0.5},
            eval_split=SPLIT,
            split_role="selection",
            tracking_uri=store["uri"],
        )


# --- promotion -------------------------------------------------------------------------------------------------------


def promote(store, name, version, **kwargs):
    return registry.promote(name, version, tracking_uri=store["uri"], n_boot=400, **kwargs)


def test_first_version_becomes_champion_and_a_noisy_tie_does_not_replace_it(store, tmp_path):
    name, client = "tie", store["client"]
    first = promote(store, name, register(store, tmp_path, name, correct_share(0.6, seed=0)).version)
    assert first.promoted and not first.forced and first.previous_champion_version is None
    assert str(first).startswith("PROMOTED v1:") and "no champion" in str(first)

    # Same number of clips right (72 of 120), different clips: the difference is 0 and its interval straddles 0.
    tie = promote(store, name, register(store, tmp_path, name, correct_share(0.6, seed=1)).version)
    assert not tie.promoted and champion_of(store, name) == 1
    low, high = tie.difference_ci95
    assert low < 0 < high
    assert "does not clear 0" in tie.reason and "n=120" in tie.reason
    tags = client.get_model_version(name, "2").tags
    assert tags["promotion.decision"] == "kept"
    assert json.loads(tags["promotion.difference_ci95"]) == [low, high]
    assert len(json.loads(tags["promotion.challenger_ci95"])) == 2 and tags["promotion.n"] == "120"

    # A slightly higher point estimate that is still noise is not promoted either.
    nudge = promote(store, name, register(store, tmp_path, name, correct_share(0.62, seed=2)).version)
    assert nudge.new_score > nudge.champion_score and not nudge.promoted


def test_a_real_improvement_is_promoted_with_both_intervals_recorded(store, tmp_path):
    name, client = "better", store["client"]
    base = correct_share(0.5, seed=3)
    promote(store, name, register(store, tmp_path, name, base).version)
    improved = base.copy()
    improved[np.flatnonzero(~base)[::2]] = True  # right on every clip v1 got right, and on half of the others
    better = promote(store, name, register(store, tmp_path, name, improved).version)
    assert better.promoted and better.previous_champion_version == 1 and champion_of(store, name) == 2
    assert better.difference_ci95[0] > 0
    assert better.challenger_ci95[0] > better.champion_ci95[0]
    assert str(better).startswith("PROMOTED v2: weighted_score")
    tags = client.get_model_version(name, "2").tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.previous_champion"] == "1"
    assert json.loads(tags["promotion.difference_ci95"])[0] > 0

    margin = promote(store, name, register(store, tmp_path, name, np.ones(120, dtype=bool)).version, margin=0.5)
    assert not margin.promoted and "does not clear 0.5" in margin.reason

    again = promote(store, name, 2)
    assert not again.promoted and "already the champion" in str(again)
    assert sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'")) == [1, 2, 3]


def test_other_split_is_not_comparable_and_force_overrides_only_that(store, tmp_path):
    name, client = "split", store["client"]
    promote(store, name, register(store, tmp_path, name, correct_share(0.5)).version)
    other = register(store, tmp_path, name, correct_share(0.9), split="val:ffff00")
    kept = promote(store, name, other.version)
    assert not kept.promoted and "not comparable" in kept.reason
    forced = promote(store, name, other.version, force=True)
    assert forced.forced and str(forced).startswith("PROMOTED v2 (forced):")
    assert champion_of(store, name) == 2
    assert client.get_model_version(name, "2").tags["promotion.forced"] == "true"


def test_refusals_that_force_cannot_override(store, tmp_path):
    name = "refuse"
    promote(store, name, register(store, tmp_path, name, correct_share(0.5)).version)
    on_test = register(store, tmp_path, name, correct_share(0.9), split="test:0123ab", role="report")
    with pytest.raises(registry.PromotionError, match="validation split only"):
        promote(store, name, on_test.version, force=True)
    not_finite = register(store, tmp_path, name, correct_share(0.9), weighted_score=float("nan"))
    with pytest.raises(registry.PromotionError, match="no finite"):
        promote(store, name, not_finite.version, force=True)
    other_task = register(store, tmp_path, name, correct_share(0.9))
    store["client"].set_model_version_tag(name, other_task.version, "task", "inspection")
    store["client"].set_model_version_tag(name, other_task.version, "metric.macro_f1", "0.9")
    with pytest.raises(registry.PromotionError, match="never replaces the other's champion"):
        promote(store, name, other_task.version, force=True)
    assert champion_of(store, name) == 1


def _promote_in_process(args) -> bool:
    uri, name, version, cache = args
    import os

    os.environ["OPSVLM_CACHE_DIR"] = cache  # where the host-wide promotion lock lives
    return registry.promote(name, version, tracking_uri=uri, n_boot=400).promoted


def test_concurrent_promotions_leave_the_better_model_as_champion(store, tmp_path, monkeypatch):
    import multiprocessing

    name = "race"
    monkeypatch.setenv("OPSVLM_CACHE_DIR", str(tmp_path / "cache"))
    base = correct_share(0.4, seed=4)
    promote(store, name, register(store, tmp_path, name, base).version)
    good = base.copy()
    good[np.flatnonzero(~base)[::3]] = True
    best = good.copy()
    best[np.flatnonzero(~good)[::2]] = True
    v_good = register(store, tmp_path, name, good).version
    v_best = register(store, tmp_path, name, best).version
    args = [(store["uri"], name, v, str(tmp_path / "cache")) for v in (v_best, v_good)]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_promote_in_process, args)
    # Serialised: whichever ran second compared itself with the first one's outcome.
    assert champion_of(store, name) == int(v_best)


def test_read_eval_needs_a_stored_summary_with_its_role(store, tmp_path):
    run_id = train_run(store, tmp_path)
    eval_id, _ = eval_run(store, run_id, correct_share(0.5))
    result = registry.read_eval(eval_id, store["uri"])
    assert (result.split_role, result.task, result.eval_split) == ("selection", "operations", SPLIT)
    broken = tmp_path / "summary.json"
    broken.write_text(json.dumps({"metrics": {"weighted_score": 0.5}, "eval_split": SPLIT}))
    with pytest.raises(ValueError, match="lacks"):
        registry.read_eval(str(broken))


# --- references ------------------------------------------------------------------------------------------------------


def test_resolve_model_refs_give_a_readable_checkpoint(store, tmp_path):
    name = "refs"
    version = register(store, tmp_path, name, correct_share(0.7))
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
    run_id = register(store, tmp_path, "bad", correct_share(0.5)).run_id
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
    _, summary = eval_run(store, first, correct_share(0.5))
    path = tmp_path / "eval_summary.json"
    path.write_text(json.dumps(summary))
    assert job.main(["--run-id", first, "--metrics", str(path), "--name", name, "--tracking-uri", store["uri"]]) == 0
    assert "PROMOTED v1" in capsys.readouterr().out

    second = train_run(store, tmp_path)
    evaluation, _ = eval_run(store, second, correct_share(0.45, seed=5))
    assert job.main(["--run-id", second, "--metrics", evaluation, "--name", name, "--tracking-uri", store["uri"]]) == 0
    out = capsys.readouterr().out
    assert "KEPT champion v1: challenger v2" in out
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

    _, report = eval_run(store, second, correct_share(0.9), split="test:77aa", role="report")
    path.write_text(json.dumps(report))
    assert job.main(["--run-id", second, "--metrics", str(path), "--name", name, "--tracking-uri", store["uri"]]) == 2
    assert "validation split only" in capsys.readouterr().err
    assert len(store["client"].search_model_versions(f"name='{name}'")) == 3
