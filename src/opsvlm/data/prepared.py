"""Reading a prepared dataset (the output of ``jobs/prepare_data.py`` / ``jobs/prepare_inspection.py``): its
manifest, one split as a Ray Dataset, or a split's label columns without the pixels."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["label_rows", "load_split", "read_manifest"]


def load_split(prepared: str | Path, split: str, limit: int | None = None):
    """A Ray Dataset of the prepared rows of one split (decoded clips, or the rows of another task: the manifest's
    ``rows_dir``)."""
    import ray.data

    path = Path(prepared) / read_manifest(prepared).get("rows_dir", "clips") / f"split={split}"
    if not path.is_dir() or not any(path.glob("*.parquet")):
        return None
    dataset = ray.data.read_parquet(str(path))
    return dataset.limit(limit) if limit is not None else dataset


def label_rows(prepared: str | Path, split: str, task) -> list[dict]:
    """The rows of a split without their pixel (binary) columns, read with pyarrow: what class counts and baselines
    need, without decoding anything."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((Path(prepared) / task.rows_dir / f"split={split}").glob("*.parquet"))
    if not files:
        return []
    columns = [f.name for f in pq.read_schema(files[0]) if f.type not in (pa.binary(), pa.large_binary())]
    return pq.ParquetDataset(files).read(columns=columns).to_pylist()


def read_manifest(prepared: str | Path) -> dict:
    path = Path(prepared) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{prepared}: no manifest.json; run jobs/prepare_data.py first")
    return json.loads(path.read_text())
