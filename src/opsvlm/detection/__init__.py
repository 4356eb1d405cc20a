"""The inspection detector at the platform's edges: Ray (training task, Ray Data batch inference, a Serve
deployment) and MLflow (tracking, registry). The pure parts live in :mod:`opsvlm.tasks.inspection.detect`.

* :mod:`.registry`: detector versions in the MLflow registry (own model name, ``challenger``/``champion``) and
  resolving a reference (``models:/name@champion``, ``runs:/...``, a file) to a local weights file.
* :mod:`.train`: ``jobs/train_detector.py``'s work: collapsed dataset -> YOLO training in one Ray task -> mAP per type
  with bootstrap intervals next to reference detectors -> MLflow -> registry.
* :mod:`.system_eval`: both stages on the test images next to perfect-stage-1 and type-aware baselines, logged to
  MLflow.
* :mod:`.batch`: detection over a folder of images with Ray Data (per-image JSON and YOLO-format predictions).
* :mod:`.serve`: a Serve deployment of the detector (batched), for the serving app to bind.
"""
