"""Register a trained adapter as a model version and promote it to ``champion`` if it beats the current one.

Run on a laptop (local MLflow store in ./mlruns)::

    python jobs/promote.py --run-id <train run id> --metrics <eval run id | eval_summary.json>

Submit to a cluster::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/promote.py --run-id <train run id> --metrics <eval run id> \
        --tracking-uri http://127.0.0.1:5000

The evaluation must be of the validation split (role ``selection``): the test split reports, it never chooses. The
new version (the run's ``checkpoint`` artifacts, tagged with base model, processor, sampling spec, labels, eval metrics
and their intervals) gets alias ``challenger``. ``champion`` moves to it only if there is none yet, or if a paired
bootstrap over the same validation examples puts the lower 95% bound of (challenger - champion) above ``--margin``.
``--force`` overrides that comparison only (never the task, split-role or finite-score checks) and is recorded on the
version. The decision is printed with both numbers and the interval; keeping the champion is not an error (exit 0).
No version is ever deleted. Serving loads ``models:/opsvlm@champion``.
"""

from __future__ import annotations

import argparse
import json
import sys

from opsvlm import registry
from opsvlm.tracking import resolve_tracking_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-id", required=True, help="training run whose checkpoint to register")
    parser.add_argument("--metrics", required=True, help="evaluation run id, or eval summary JSON file")
    parser.add_argument("--name", default=registry.DEFAULT_NAME, help="registered model name (default: opsvlm)")
    parser.add_argument("--force", action="store_true", help="promote even if not better (recorded on the version)")
    parser.add_argument("--margin", type=float, default=0.0, help="required lower bound of the score difference")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI/local)")
    args = parser.parse_args(argv)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)

    try:
        # 1. the evaluation of this run: metrics and the split they were computed on
        evaluation = registry.read_eval(args.metrics, tracking_uri)
        if evaluation.train_run_id and evaluation.train_run_id != args.run_id:
            raise ValueError(f"{args.metrics} evaluated run {evaluation.train_run_id}, not {args.run_id}")
        if evaluation.split_role != "selection":
            raise ValueError(
                f"{args.metrics} scored the {evaluation.eval_split} split (role {evaluation.split_role}): promotion "
                "chooses on the validation split only; evaluate with split=val"
            )

        # 2. a new model version, alias challenger
        version = registry.register_version(
            args.run_id,
            name=args.name,
            metrics=evaluation.metrics,
            eval_split=evaluation.eval_split,
            split_role=evaluation.split_role,
            eval_run_id=evaluation.eval_run_id,
            tracking_uri=tracking_uri,
        )
        print(f"registered {args.name} v{version.version} from runs:/{args.run_id}/checkpoint (alias challenger)")

        # 3. champion only through the paired gate on the same validation examples (or forced)
        decision = registry.promote(
            args.name, version.version, force=args.force, margin=args.margin, tracking_uri=tracking_uri
        )
    except (ValueError, FileNotFoundError, registry.PromotionError) as exc:
        print(f"promote: {exc}", file=sys.stderr)
        return 2
    print(decision)
    print(
        json.dumps(
            {
                "name": args.name,
                "version": decision.version,
                "promoted": decision.promoted,
                "forced": decision.forced,
                "new_score": decision.new_score,
                "champion_score": decision.champion_score,
                "difference_ci95": decision.difference_ci95,
                "previous_champion_version": decision.previous_champion_version,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
