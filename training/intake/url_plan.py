"""A URL list's sync plan, made in record batches: a list of any length is planned in
the memory of one batch.

Each batch of the normalised list (``urls.parquet``) gets its row ids, each row is
matched against the base in the source's order (``sync.Matcher``), and the rows to
fetch are appended, row id included, to the fetch list img2dataset reads. The rows
fetched, kept and their order are those of matching the whole list at once (was: the
list read whole and turned into Python lists, about 450 bytes a row: 4.5 GB at 10M
rows).
"""

from __future__ import annotations

from pathlib import Path

from training.config import Params
from training.intake import sync

BATCH_ROWS = 20_000  # ~5 MB of Python objects; at 1M rows as fast as 50k


def plan_url_list(
    params: Params, out_dir: Path, url_list: Path, fetch_list: Path
) -> tuple[sync.Plan, int]:
    """(the plan against the base in ``out_dir``, the list's row count). The rows to
    fetch are written to ``fetch_list`` (the list's columns and ``row_id``); none, and
    it is not written (nothing is downloaded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    plan, match = sync.start(params, out_dir)
    source = pq.ParquetFile(url_list)
    schema = source.schema_arrow.append(pa.field(sync.ROW_ID, pa.string()))
    tmp = fetch_list.with_name(fetch_list.name + ".tmp")
    writer = None
    total = 0
    try:
        for batch in source.iter_batches(batch_size=BATCH_ROWS):
            urls, caps = batch.column("url").to_pylist(), batch.column("caption").to_pylist()
            ids = [sync.url_row_id(u, c) for u, c in zip(urls, caps, strict=True)]
            wanted = [match is None or match.fetches(rid) for rid in ids]
            total += len(ids)
            rows = pa.Table.from_batches([batch]).append_column(
                sync.ROW_ID, pa.array(ids, pa.string())
            )
            rows = rows.filter(pa.array(wanted, pa.bool_()))
            if rows.num_rows:
                writer = writer or pq.ParquetWriter(tmp, schema)
                writer.write_table(rows)
    finally:
        if writer is not None:
            writer.close()
    if match is None:
        plan.fetching = total
    if writer is not None:
        tmp.replace(fetch_list)
    return (match.finish() if match else plan), total
