"""Run an end-to-end job on several seeds from an empty model cache, store each run's summary, and regenerate the
README's figures from the stored summaries (never typed by hand).

    python jobs/report.py run --seeds 0 1 2                     # the main job (jobs/pipeline.py)
    python jobs/report.py run --job inspection --seeds 0        # jobs/inspection_pipeline.py
    python jobs/report.py timelines --seed 0                    # main job, then jobs/annotate.py on val and test
    python jobs/report.py bench annotate                        # benchmarks/bench_annotate.py, result stored
    python jobs/report.py fresh /tmp/fresh-run.XXXX ...         # store what ../shared/scripts/fresh-run left
    python jobs/report.py render                                # README blocks between <!-- figures:NAME --> markers

Each seed runs in a new workdir with a new MLflow store and an empty model cache. ``run`` writes
``reports/<job>/seed<k>.json``: the job's final JSON line, the stored validation and test evaluation summaries
(split, role, n, groups, intervals, seed, commit), the wall time and the console. ``render`` rewrites only the marked
blocks of README.md: ``<job>-seeds`` (one row per seed) and ``<job>-systems`` (every system of the first seed).
``timelines`` runs the main job, then ``jobs/annotate.py`` with its model on the validation subjects' recordings
(where the decoder is chosen) and on the test subjects' (report), and writes ``reports/annotate/``.
``bench NAME [ARGS]`` runs ``benchmarks/bench_NAME.py ARGS`` and stores its final JSON line with the commit, the
command, the 1-minute load average before and after and the wall time in ``reports/bench/NAME.json`` (README block
``bench-NAME``). ``fresh DIR...`` stores the outcome of ``../shared/scripts/fresh-run`` folders (the cloned commit,
the console's line count and last JSON line) in ``reports/fresh_run/<commit>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORTS = REPO / "reports"
READMES = (REPO / "README.md", REPO / "benchmarks" / "README.md")
JOBS = {"pipeline": "pipeline.py", "inspection": "inspection_pipeline.py"}


def run(job: str, seeds: list[int], extra: list[str]) -> None:
    """Run the job once per seed in a fresh workdir with an empty model cache; store the summaries."""
    import mlflow

    out = REPORTS / job
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix=f"report-seed{seed}-") as tmp:
            tmp = Path(tmp)
            uri = f"sqlite:///{tmp / 'mlflow.db'}"
            env = {**os.environ, "OPSVLM_CACHE_DIR": str(tmp / "cache"), "MLFLOW_TRACKING_URI": uri}
            command = [sys.executable, str(REPO / "jobs" / JOBS[job]), "--workdir", str(tmp / "work"),
                       f"seed={seed}", f"tracking_uri={uri}", *extra]  # fmt: skip
            started = time.perf_counter()
            done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"seed {seed}: the main job failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                                 f"{done.stderr[-3000:]}")  # fmt: skip
            lines = done.stdout.strip().splitlines()
            summary = json.loads(lines[-1])
            evaluations = {}
            for key in ("val_eval_run_id", "test_eval_run_id"):
                local = mlflow.artifacts.download_artifacts(
                    f"runs:/{summary[key]}/eval_summary.json", dst_path=str(tmp / key), tracking_uri=uri
                )
                evaluations[key.split("_")[0]] = json.loads(Path(local).read_text())
            record = {"seed": seed, "wall_s": round(wall, 1), "console_lines": len(lines), "job": summary,
                      "evaluations": evaluations, "console": lines}  # fmt: skip
            (out / f"seed{seed}.json").write_text(json.dumps(record, indent=2) + "\n")
            print(f"{job} seed {seed}: {wall:.0f} s, {json.dumps({k: v for k, v in summary.items() if 'test' in k})}")


def _commit() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip()


def _last_json(command: list[str], cwd: Path, env: dict[str, str], what: str) -> dict:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def timelines(seed: int) -> None:
    """Main job on ``seed`` (new workdir, empty cache), then whole-recording annotation with the model version it
    registered: the validation subjects' recordings choose the decoder, the test subjects' are reported with it."""
    out = REPORTS / "annotate"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"report-timelines-seed{seed}-") as tmp:
        tmp = Path(tmp)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        env = {**os.environ, "OPSVLM_CACHE_DIR": str(tmp / "cache"), "MLFLOW_TRACKING_URI": uri}
        work = tmp / "work"
        job = _last_json([sys.executable, str(REPO / "jobs" / "pipeline.py"), "--workdir", str(work), f"seed={seed}",
                          f"tracking_uri={uri}"], tmp, env, "the main job")  # fmt: skip
        model = f"models:/{job['model_name']}/{job['model_version']}"
        manifest = json.loads((work / "prepared" / "manifest.json").read_text())
        results, decoder = {}, "viterbi"
        for split in ("val", "test"):
            root = tmp / f"recordings-{split}"  # an OpenPack-layout root of this split's subjects only
            root.mkdir()
            for subject in manifest["splits"][split]["subjects"]:
                (root / subject).symlink_to(work / "synthetic" / subject)
            annotated = tmp / f"annotated-{split}"
            _last_json([sys.executable, str(REPO / "jobs" / "annotate.py"), "--model", model, "--source", str(root),
                        "--out", str(annotated), f"grammar={work / 'prepared'}", f"decoder={decoder}",
                        f"tracking.tracking_uri={uri}"], tmp, env, f"annotating the {split} recordings")  # fmt: skip
            summary = json.loads((annotated / "summary.json").read_text())
            scores = json.loads((annotated / "scores.json").read_text())
            results[split] = {"summary": summary, "scores": scores}
            if split == "val":  # choose the decoder on validation: the one with the higher frame macro-F1
                by_decoder = {"viterbi": "grammar_frame_macro_f1", "argmax": "argmax_frame_macro_f1"}
                decoder = max(by_decoder, key=lambda d: summary[by_decoder[d]])
        for split, result in results.items():
            (out / f"{split}_summary.json").write_text(json.dumps(result["summary"], indent=2) + "\n")
            (out / f"{split}_scores.json").write_text(json.dumps(result["scores"], indent=2) + "\n")
        # the README's picture: the first test recording's Gantt chart (truth above prediction) from this run
        gantt = sorted((tmp / "annotated-test").glob("*.png"))[0]
        picture = REPO / "docs" / "images" / f"timeline_{gantt.name}"
        shutil.copyfile(gantt, picture)
        meta = {"seed": seed, "commit": _commit(), "decoder": decoder, "decoder_chosen_on": "val", "model": model,
                "subjects": {s: manifest["splits"][s]["subjects"] for s in results},
                "gantt": str(picture.relative_to(REPO))}  # fmt: skip
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(json.dumps({"decoder": decoder, **{k: v for k, v in results["test"]["summary"].items() if "f1" in k}}))


def bench(name: str, extra: list[str]) -> None:
    """Run one benchmark script and store its final JSON line with where and how it ran."""
    script = REPO / "benchmarks" / f"bench_{name}.py"
    if not script.is_file():
        raise SystemExit(f"no benchmark {script}")
    git = ["git", "-C", str(REPO)]
    commit = _commit()
    code = ["src", "benchmarks/*.py", "serve_app", "jobs", "pyproject.toml"]  # what the run executes, not the docs
    status = subprocess.run([*git, "status", "--porcelain", "--", *code], capture_output=True, text=True)
    dirty = bool(status.stdout.strip())
    command = [sys.executable, str(script), *extra]
    load_before, started = os.getloadavg()[0], time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    wall, load_after = time.perf_counter() - started, os.getloadavg()[0]
    if done.returncode != 0:
        raise SystemExit(f"bench {name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    record = {"benchmark": name, "commit": commit, "tree_dirty": dirty, "date": time.strftime("%Y-%m-%d %H:%M UTC",
              time.gmtime()), "command": ["python", f"benchmarks/bench_{name}.py", *extra], "wall_s": round(wall, 1),
              "load_1m_before": round(load_before, 2), "load_1m_after": round(load_after, 2), "cpus": os.cpu_count(),
              "result": result}  # fmt: skip
    (REPORTS / "bench").mkdir(parents=True, exist_ok=True)  # named by the JSON's benchmark (serve, serve_overload)
    (REPORTS / "bench" / f"{result['benchmark']}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(result))


def fresh(folders: list[str]) -> None:
    """Store what ``../shared/scripts/fresh-run`` left in each folder: the commit it cloned, its console and JSON."""
    out = REPORTS / "fresh_run"
    out.mkdir(parents=True, exist_ok=True)
    for folder in map(Path, folders):
        done = subprocess.run(["git", "-C", str(folder / "project"), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True)  # fmt: skip
        commit = done.stdout.strip()
        console = (folder / "main.log").read_text().splitlines()
        last = next((line for line in reversed(console) if line.startswith("{")), None)
        record = {"commit": commit, "console_lines": len(console), "exit_ok": last is not None,
                  "job": json.loads(last) if last else None, "console": console}  # fmt: skip
        (out / f"{commit}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"{folder}: commit {commit}, {len(console)} console lines")


def _rows(value: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Table rows of a benchmark's JSON: each top-level scalar on its own row; below that one row per nested object,
    its scalars as ``name value`` pairs (so a level of a load test is one row)."""
    rows, scalars = [], []
    for key, inner in value.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(inner, dict):
            rows += _rows(inner, path)
        elif prefix:
            scalars.append(f"{key} {inner}")
        else:
            rows.append((path, str(inner)))
    return ([(prefix, "; ".join(scalars))] if scalars else []) + rows


def bench_blocks() -> dict[str, str]:
    """One block per stored benchmark run (``bench-<benchmark>``): where it ran, then every figure of its JSON line."""
    blocks = {}
    for path in sorted((REPORTS / "bench").glob("*.json")):
        record = json.loads(path.read_text())
        dirty = " (uncommitted changes)" if record["tree_dirty"] else ""
        head = (
            f"`{' '.join(record['command'])}` at commit {record['commit']}{dirty}, {record['date']}, "
            f"{record['cpus']} CPUs, 1-minute load {record['load_1m_before']} before and {record['load_1m_after']} "
            f"after, {record['wall_s']:.0f} s; stored in `reports/bench/{path.name}`."
        )
        figures = {k: v for k, v in record["result"].items() if k != "benchmark"}
        rows = ["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in _rows(figures))]
        blocks[f"bench-{record['result']['benchmark']}"] = "\n".join([head, "", *rows])
    return blocks


def _cell(value: float | None, ci: list[float | None] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if not ci or None in ci else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _systems_table(metrics: tuple[str, ...], systems: dict[str, tuple[dict, dict]]) -> list[str]:
    """Markdown rows: one per system, ``value [low, high]`` per metric (``{name: (values, intervals)}``)."""
    lines = ["| system | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name, (values, cis) in systems.items():
        lines.append(f"| {name} | " + " | ".join(_cell(values.get(m), cis.get(m)) for m in metrics) + " |")
    return lines


def tables(job: str) -> dict[str, str]:
    """The README blocks of one job, from its stored summaries."""
    from opsvlm.tasks.base import get_task

    records = [json.loads(p.read_text()) for p in sorted((REPORTS / job).glob("seed*.json"))]
    if not records:
        return {}
    first = records[0]["evaluations"]["test"]
    task = get_task(first["task"])
    h = task.headline_metric
    baseline = "type-majority" if "type-majority" in first["table"] else "majority"
    seeds = [f"| seed | commit | val {h} (n) | test {h} [95% CI] | {baseline} (test) | CI above it | promoted | "
             "job wall s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        test, val = r["evaluations"]["test"], r["evaluations"]["val"]
        low = test["intervals"]["fine-tuned"][h][0]
        reference = test["table"][baseline][h]
        seeds.append(
            f"| {r['seed']} | {test['commit']} | {val['metrics'][h]:.3f} ({val['n']}) | "
            f"{_cell(test['metrics'][h], test['intervals']['fine-tuned'][h])} | {reference:.3f} | "
            f"{'yes' if low > reference else 'no'} | {r['job']['promoted']} | {r['wall_s']:.0f} |"
        )
    boundary = first["metrics"].get("n_boundary_clips")
    head = (
        f"Test split (report only), seed {records[0]['seed']}, commit {first['commit']}: n = {first['n']} "
        f"{task.unit}{f' ({int(boundary)} of them boundary clips)' if boundary is not None else ''} in "
        f"{first['groups']} resampling groups; 95% intervals by group bootstrap ({first['n_boot']} resamples)."
    )
    metrics = task.table_metrics
    rows = {name: (values, first["intervals"].get(name, {})) for name, values in first["table"].items()}
    systems = [head, "", *_systems_table(metrics, rows)]
    return {f"{job}-seeds": "\n".join(seeds), f"{job}-systems": "\n".join(systems)}


def console_block(job: str = "pipeline") -> dict[str, str]:
    """The console of the first stored seed run, up to the results table (what a person sees while it runs)."""
    paths = sorted((REPORTS / job).glob("seed*.json"))
    if not paths:
        return {}
    record = json.loads(paths[0].read_text())
    lines = []
    for line in record["console"]:
        if not line.strip():
            break
        lines.append(line)
    commit = record["evaluations"]["test"]["commit"]
    body = "\n".join(lines)
    return {f"{job}-console": f"The console of seed {record['seed']} (commit {commit}):\n\n```\n{body}\n```"}


def rerun_table(job: str = "pipeline") -> dict[str, str]:
    """Same seed, run twice (``reports/<job>/rerun/seed<k>.json`` beside ``reports/<job>/seed<k>.json``)."""
    lines = ["| seed | split | first run | rerun | difference |", "|---|---|---|---|---|"]
    for rerun_path in sorted((REPORTS / job / "rerun").glob("seed*.json")):
        first_path = REPORTS / job / rerun_path.name
        if not first_path.is_file():
            continue
        first, rerun = json.loads(first_path.read_text()), json.loads(rerun_path.read_text())
        from opsvlm.tasks.base import get_task

        metric = get_task(first["evaluations"]["test"]["task"]).headline_metric
        for split in ("val", "test"):
            a = first["evaluations"][split]["metrics"][metric]
            b = rerun["evaluations"][split]["metrics"][metric]
            lines.append(f"| {first['seed']} | {split} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    return {f"{job}-rerun": "\n".join(lines)} if len(lines) > 2 else {}


def annotation_table() -> dict[str, str]:
    """The README block of the stored annotation runs (``reports/annotate/``: meta, val and test summaries, scores)."""
    folder = REPORTS / "annotate"
    if not (folder / "meta.json").is_file():
        return {}
    meta = json.loads((folder / "meta.json").read_text())
    scores = json.loads((folder / "test_scores.json").read_text())
    summary = json.loads((folder / "test_summary.json").read_text())
    val = json.loads((folder / "val_summary.json").read_text())
    metrics = ("frame_macro_f1", "edit_score", "f1_at_10", "f1_at_25", "f1_at_50", "next_accuracy_at_boundaries")
    lines = [
        f"Main job seed {meta['seed']}, commit {meta['commit']}, its registered model. Test subjects "
        f"{', '.join(meta['subjects']['test'])}: {summary['sessions_scored']} sessions, "
        f"{summary['seconds_annotated']:.0f} s annotated; 95% intervals by session. Decoder `{meta['decoder']}`, "
        f"chosen on the validation subjects ({', '.join(meta['subjects']['val'])}: frame macro-F1 "
        f"{val['grammar_frame_macro_f1']:.3f} with the grammar, {val['argmax_frame_macro_f1']:.3f} per-second "
        f"argmax); grammar: {summary['grammar'].split(' of ')[0]}.",
        "",
    ]
    systems = {name: (v, {m: v.get(f"{m}_ci95") for m in metrics}) for name, v in scores.items() if isinstance(v, dict)}
    lines += _systems_table(metrics, systems)
    if meta.get("gantt"):
        lines += ["", f"![{meta['gantt'].split('_', 1)[1][:-4]}: truth above the prediction]({meta['gantt']})"]
    return {"annotate": "\n".join(lines)}


def stage1_table() -> dict[str, str]:
    """The README block of a stored two-stage system evaluation (``reports/stage1/system_eval.json``)."""
    path = REPORTS / "stage1" / "system_eval.json"
    if not path.is_file():
        return {}
    stored = json.loads(path.read_text())
    table, intervals, seconds = stored["table"], stored["intervals"], stored["seconds"]
    first = next(iter(table.values()))
    metrics = ("detection/precision", "detection/recall", "matched/macro_f1", "e2e/macro_f1", "e2e/accuracy")
    lines = [
        f"Test split: {int(first['n_images'])} images, {int(first['n_true'])} objects; 95% intervals by image. "
        f"Seconds per image: detector {seconds['detect']:.3f}, VLM on the detected objects {seconds['classify']:.3f}"
        f" ({seconds['classify_per_object']:.3f} per object).",
        "",
        *_systems_table(metrics, {name: (values, intervals.get(name, {})) for name, values in table.items()}),
    ]
    return {"stage1": "\n".join(lines)}


def plan_table() -> dict[str, str]:
    """The memory planner's verdict for the GPU presets (computed from ``jobs/configs``, nothing measured): 8 frames at
    224x224 per clip, the planner choosing the micro-batch for the preset's global batch."""
    from opsvlm.config import load_config
    from opsvlm.model.plan import plan_memory
    from opsvlm.train.config import TrainConfig

    lines = [
        "| preset | model | GPUs | weights | activations | total | recommendation |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset in ("t4_qlora_3b", "a100_lora_7b"):
        config = load_config(TrainConfig, REPO / "jobs" / "configs" / f"{preset}.yaml", [])
        model, scaling = config.model, config.scaling
        plan = plan_memory(config.plan_inputs(model.name, 8, 224, 224, micro_batch=None)).to_dict()
        gib, advice = plan["gib"], plan["recommendation"]
        kind = model.quantization if model.quantization != "none" else "16-bit"
        zero = f", ZeRO-{scaling.zero_stage}" if scaling.zero_stage else ""
        lines.append(
            f"| `{preset}` | {model.name.split('/')[-1]}, {kind}{zero} | {scaling.num_workers}x {scaling.gpu_type} | "
            f"{gib['weights']:.2f} GiB | {gib['activations']:.2f} GiB | {gib['total']:.2f} GiB | micro-batch "
            f"{advice['micro_batch']}, grad accum {advice['grad_accum']} |"
        )
    return {"plan": "\n".join(lines)}


def render() -> None:
    """Replace every ``<!-- figures:NAME -->`` ... ``<!-- /figures:NAME -->`` block that has data, in README.md and
    benchmarks/README.md (each block stands in one of them)."""
    blocks = (
        {name: block for job in JOBS for name, block in tables(job).items()}
        | console_block()
        | rerun_table()
        | annotation_table()
        | stage1_table()
        | plan_table()
        | bench_blocks()
    )
    texts = {path: path.read_text() for path in READMES}
    for name, block in blocks.items():
        start, end = f"<!-- figures:{name} -->", f"<!-- /figures:{name} -->"
        path = next((p for p, text in texts.items() if start in text and end in text), None)
        if path is None:
            raise SystemExit(f"no {start} ... {end} block in {', '.join(str(p) for p in READMES)}")
        before, rest = texts[path].split(start, 1)
        _, after = rest.split(end, 1)
        texts[path] = f"{before}{start}\n{block}\n{end}{after}"
    for path, text in texts.items():
        path.write_text(text)
    print(f"{len(blocks)} figure blocks regenerated from the stored summaries in {REPORTS}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runs = sub.add_parser("run", help="run a job per seed and store the summaries")
    runs.add_argument("--job", choices=sorted(JOBS), default="pipeline")
    runs.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    runs.add_argument("overrides", nargs="*", help="extra jobs/pipeline.py overrides")
    lines = sub.add_parser("timelines", help="main job, then whole-recording annotation on val and test")
    lines.add_argument("--seed", type=int, default=0)
    benches = sub.add_parser("bench", help="run a benchmark script and store its JSON line")
    benches.add_argument("name", help="NAME of benchmarks/bench_NAME.py")
    benches.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    fresh_runs = sub.add_parser("fresh", help="store the outcome of ../shared/scripts/fresh-run folders")
    fresh_runs.add_argument("folders", nargs="+")
    sub.add_parser("render", help="regenerate the README figures from the stored summaries")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.job, args.seeds, args.overrides)
    elif args.command == "timelines":
        timelines(args.seed)
    elif args.command == "bench":
        bench(args.name, args.args)
    elif args.command == "fresh":
        fresh(args.folders)
    render()
    return 0


if __name__ == "__main__":
    sys.exit(main())
