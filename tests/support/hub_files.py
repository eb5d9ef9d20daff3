"""Files the test Hub server serves: alpaca parquet shards and a model folder's bytes."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kfp_finetune.drivers.fixtures import alpaca_rows


def parquet_bytes(rows: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(alpaca_rows(rows, seed)), buf)
    return buf.getvalue()


def big_parquet_bytes(rows: int) -> bytes:
    """~4 KiB of incompressible text per row, so the file spans several client chunks."""
    import base64
    import random

    rng = random.Random(7)
    data = alpaca_rows(rows, 1)
    for row in data:
        row["output"] += " " + base64.b64encode(rng.randbytes(3000)).decode()
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(data), buf)
    return buf.getvalue()


def model_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
