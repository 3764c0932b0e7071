"""The results schema: one flat, versioned Parquet row per cell.

Every package agrees on these column names; `analysis` reads them by name from Parquet, the
orchestrator writes them through `orchestrator.store`, and `workers.run_cell` fills them in.
Bump SCHEMA_VERSION whenever a column is added, removed or changes meaning, and ID_SCHEMA_VERSION,
which is part of every cell id, with it unless rows written under the old one stay valid for every
reader: then a stored sweep resumes instead of running every cell again, and its old rows never
silently mix with rows whose columns mean something else.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 3  # 2: base_neutral_nll, base_neutral_nll_per_byte; 3: score_outcomes
# 3 only added a column analysis does without where a row lacks it (its intervals then redraw seeds
# only, and the report says so), so the cells of a sweep stored under 2 keep their ids.
ID_SCHEMA_VERSION = 2

RESULT_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("sweep", pa.string(), nullable=False),
        pa.field("cell_id", pa.string(), nullable=False),
        pa.field("slug", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "failed"
        pa.field("error", pa.string()),
        pa.field("attempt", pa.int32()),
        pa.field("model", pa.string()),
        pa.field("family", pa.string()),
        pa.field("params_total", pa.int64()),
        pa.field("params_nonembed", pa.int64()),
        pa.field("task", pa.string()),
        pa.field("task_type", pa.string()),
        pa.field("method", pa.string()),
        pa.field("budget", pa.int64()),  # post-training examples
        pa.field("train_tokens", pa.int64()),
        pa.field("seed", pa.int64()),
        pa.field("score", pa.float64()),
        # each test example's result behind `score` (True: solved), in the test split's order: the same
        # examples for every cell of a task, so analysis redraws them together with the seeds
        pa.field("score_outcomes", pa.list_(pa.bool_())),
        pa.field("score_base", pa.float64()),
        pa.field("score_elicited", pa.float64()),
        pa.field("nll", pa.float64()),
        pa.field("nll_base", pa.float64()),
        pa.field("base_neutral_nll", pa.float64()),  # base model on neutral (pretraining-like) text, nats/token
        pa.field("base_neutral_nll_per_byte", pa.float64()),  # the same per UTF-8 byte: tokenizer-free capability
        pa.field("offtask_score_delta", pa.float64()),
        pa.field("neutral_kl", pa.float64()),
        pa.field("neutral_ppl_ratio", pa.float64()),
        pa.field("trainable_params", pa.int64()),
        pa.field("post_train_flops", pa.float64()),
        pa.field("train_seconds", pa.float64()),
        pa.field("eval_seconds", pa.float64()),
        pa.field("peak_mem_bytes", pa.int64()),
        pa.field("layer", pa.int64()),
        pa.field("alpha", pa.float64()),
        pa.field("selection", pa.string()),  # how hyper-parameters were chosen (fair-selection protocol)
        pa.field("val_labels", pa.int64()),  # labelled validation examples used for that choice
        pa.field("hparams", pa.string()),  # JSON
        pa.field("versions", pa.string()),  # JSON
        pa.field("git_sha", pa.string()),
        pa.field("device", pa.string()),
        pa.field("started_at", pa.timestamp("us", tz="UTC")),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={"steerscale.schema_version": str(SCHEMA_VERSION)},
)

COLUMNS: tuple[str, ...] = tuple(RESULT_SCHEMA.names)


def to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts keyed by column name; missing keys become null) as a table in the schema."""
    unknown = {key for row in rows for key in row} - set(COLUMNS)
    if unknown:
        raise KeyError(f"row has columns outside the results schema: {sorted(unknown)}")
    return pa.Table.from_pylist([{c: row.get(c) for c in COLUMNS} for row in rows], schema=RESULT_SCHEMA)
