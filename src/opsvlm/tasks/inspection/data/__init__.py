"""The inspection task's data: the YOLO export reader and stage-1 detections (yolo), synthetic scenes (synthetic)."""
