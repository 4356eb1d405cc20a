"""Stage 1 of the inspection task: a YOLO detector that finds the objects whose condition the VLM classifies.

Pure modules (no Ray, no MLflow; Ultralytics only imported lazily inside :mod:`.ultralytics_backend`):

* :mod:`.detector`: :class:`~.detector.Detection`, the :class:`~.detector.Detector` interface, the validated mapping
  from a detector's class names to the task's object types (:class:`~.detector.ClassMapping`) and the loader.
* :mod:`.dataset`: the YOLO-format export with the 9 condition classes collapsed to the 4 object types.
* :mod:`.ultralytics_backend`: the Ultralytics YOLO backend (``.pt`` checkpoints, ONNX exports through
  onnxruntime), offline setup (no font, asset or weight downloads) and training from a model YAML or a checkpoint.
* :mod:`.matching`: box IoU, prediction-to-truth matching, detection precision/recall and average precision (numpy).
* :mod:`.system`: both stages on images, the system evaluation (per-type detection P/R, condition macro-F1 on matched
  objects, end-to-end macro-F1 counting misses and spurious objects) with image-bootstrap intervals.
* :mod:`.export`: per-image JSON and YOLO-format prediction files.

The detector is an optional extra (``pip install opsvlm[detect]``); Ultralytics is AGPL-3.0 licensed.
"""
