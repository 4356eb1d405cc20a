"""Run the README main command on several seeds from an empty model cache, store each run's summary, and regenerate
the README's figures from the stored summaries (never typed by hand).

    python jobs/report.py run --seeds 0 1 2      # each seed: a new workdir, MLflow store and model cache
    python jobs/report.py render                 # README tables between <!-- figures:NAME --> markers

``run`` writes ``reports/main_job/seed<k>.json``: the job's final JSON line, the stored test and validation
evaluation summaries (split, role, n, groups, intervals, seed, commit), the wall time and the console line count.
``render`` rewrites only the marked blocks of README.md from those files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORTS = REPO / "reports" / "main_job"
README = REPO / "README.md"
SYSTEMS = ("fine-tuned", "majority", "fine-tuned+whole-clip", "fine-tuned+grammar", "untrained-base", "free-generation")
METRICS = ("weighted_score", "oca", "tiou_at_0_5", "boundary_tiou_at_0_5", "aa_at_1")


def run(seeds: list[int], extra: list[str]) -> None:
    """Run ``jobs/pipeline.py`` once per seed in a fresh workdir with an empty model cache; store the summaries."""
    import mlflow

    REPORTS.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix=f"report-seed{seed}-") as tmp:
            tmp = Path(tmp)
            uri = f"sqlite:///{tmp / 'mlflow.db'}"
            env = {**os.environ, "OPSVLM_CACHE_DIR": str(tmp / "cache"), "MLFLOW_TRACKING_URI": uri}
            command = [sys.executable, str(REPO / "jobs" / "pipeline.py"), "--workdir", str(tmp / "work"),
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
            (REPORTS / f"seed{seed}.json").write_text(json.dumps(record, indent=2) + "\n")
            print(f"seed {seed}: {wall:.0f} s, test weighted {summary['test_weighted_score']:.3f} "
                  f"{summary['test_weighted_score_ci95']}, majority {summary['majority_test_weighted_score']:.3f}")  # fmt: skip


def _cell(value: float, ci: list[float] | None) -> str:
    return f"{value:.3f}" if not ci else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def tables() -> dict[str, str]:
    """The README blocks, from the stored summaries."""
    records = [json.loads(p.read_text()) for p in sorted(REPORTS.glob("seed*.json"))]
    if not records:
        raise SystemExit(f"no stored summaries in {REPORTS}: run `python jobs/report.py run` first")
    seeds = ["| seed | commit | val weighted (n) | test weighted [95% CI] | majority (test) | beats majority | "
             "boundary tIoU@0.5 (n) | promoted | wall s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        test, val = r["evaluations"]["test"], r["evaluations"]["val"]
        job, model = r["job"], test["table"]["fine-tuned"]
        low = test["intervals"]["fine-tuned"]["weighted_score"][0]
        majority = test["table"]["majority"]["weighted_score"]
        seeds.append(
            f"| {r['seed']} | {test['commit']} | {val['metrics']['weighted_score']:.3f} ({val['n']}) | "
            f"{_cell(model['weighted_score'], test['intervals']['fine-tuned']['weighted_score'])} | {majority:.3f} | "
            f"{'yes' if low > majority else 'no'} | {model['boundary_tiou_at_0_5']:.3f} "
            f"({int(model['n_boundary_clips'])}) | {job['promoted']} | {r['wall_s']:.0f} |"
        )
    first = records[0]["evaluations"]["test"]
    head = f"Test split (report only): n = {first['n']} clips in {first['groups']} resampling groups, seed {records[0]['seed']}, commit {first['commit']}."  # noqa: E501
    systems = [head, "", "| system | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name in SYSTEMS:
        if name in first["table"]:
            values, cis = first["table"][name], first["intervals"].get(name, {})
            systems.append(f"| {name} | " + " | ".join(_cell(values[m], cis.get(m)) for m in METRICS) + " |")
    return {"seeds": "\n".join(seeds), "systems": "\n".join(systems)}


def render() -> None:
    """Replace every ``<!-- figures:NAME -->`` ... ``<!-- /figures:NAME -->`` block of the README."""
    text = README.read_text()
    for name, block in tables().items():
        start, end = f"<!-- figures:{name} -->", f"<!-- /figures:{name} -->"
        if start not in text or end not in text:
            raise SystemExit(f"README.md has no {start} ... {end} block")
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = f"{before}{start}\n{block}\n{end}{after}"
    README.write_text(text)
    print(f"README.md: figures regenerated from {len(list(REPORTS.glob('seed*.json')))} stored summaries")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runs = sub.add_parser("run", help="run the main job per seed and store the summaries")
    runs.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    runs.add_argument("overrides", nargs="*", help="extra jobs/pipeline.py overrides")
    sub.add_parser("render", help="regenerate the README figures from the stored summaries")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.seeds, args.overrides)
    render()
    return 0


if __name__ == "__main__":
    sys.exit(main())
