"""The DuckDB index schema (see docs/store-format.md for the on-disk format).

Every table is plain SQL so that a user can read a store with nothing but DuckDB.
``SCHEMA_VERSION`` is bumped whenever a table changes shape, together with a migration from
the previous version in :mod:`.migrations` (stores are migrated when opened).
"""

SCHEMA_VERSION = 3

# Cell columns every dataset has; extra ``obs`` columns are added beside them at ingest.
CELL_CORE_COLUMNS = ("dataset", "row", "obs_name", "label", "label_raw", "sample", "patient")

# Dataset-level context that the ``cohort`` view adds to every cell.
DATASET_CONTEXT_COLUMNS = ("drug", "cancer_type", "tissue", "therapy", "regimen")

# Answers of chat models to zero-shot prompts (scdrugmap zero-shot), so that a rerun pays
# nothing. IF NOT EXISTS: stores created before this table get it on their first zero-shot run.
ZERO_SHOT_CACHE_DDL = """CREATE TABLE IF NOT EXISTS zero_shot_cache (
        key VARCHAR PRIMARY KEY,            -- sha256 of model + newline + prompt
        model VARCHAR NOT NULL,
        prompt VARCHAR NOT NULL,            -- the exact messages JSON sent
        response VARCHAR NOT NULL,          -- the answer text (empty when the model gave none)
        created_at TIMESTAMP NOT NULL
    )"""

# Heads fitted on a whole cohort (scdrugmap fit): their files live in ``models/heads/<name>/``
# (arrays in .npz, LightGBM's text model, and a manifest.json with each file's sha256).
MODELS_DDL = """CREATE TABLE IF NOT EXISTS models (
        name VARCHAR PRIMARY KEY,
        created_at TIMESTAMP NOT NULL,
        backbone VARCHAR NOT NULL,
        head VARCHAR NOT NULL,
        method VARCHAR NOT NULL,            -- frozen
        where_sql VARCHAR,                  -- the cohort it was fitted on
        datasets VARCHAR[] NOT NULL,
        n_cells INTEGER NOT NULL,
        n_sensitive INTEGER NOT NULL,
        n_resistant INTEGER NOT NULL,
        seed INTEGER NOT NULL,
        dim INTEGER NOT NULL,
        folder VARCHAR NOT NULL,            -- relative to the store: models/heads/<name>
        manifest_sha256 VARCHAR NOT NULL,   -- sha256 of the folder's manifest.json
        provenance VARCHAR NOT NULL,        -- JSON: the backbone's provenance of each training dataset
        params VARCHAR NOT NULL,            -- JSON: the head's resolved parameters
        cv_scores VARCHAR,                  -- JSON: the latest probe runs of the same configuration
        scdrugmap_version VARCHAR NOT NULL
    )"""

# Per-cell output of scdrugmap predict: the probability of resistance and the call.
PREDICTIONS_DDL = """CREATE TABLE IF NOT EXISTS predictions (
        model VARCHAR NOT NULL,
        dataset VARCHAR NOT NULL,
        "row" INTEGER NOT NULL,
        probability REAL NOT NULL,          -- P(resistant) from the model's head
        call VARCHAR NOT NULL,              -- resistant (probability >= threshold) | sensitive
        threshold REAL NOT NULL,
        predicted_at TIMESTAMP NOT NULL,
        PRIMARY KEY (model, dataset, "row")
    )"""
# Out-of-fold score of every held-out cell of every probe run, so that any metric, interval or
# curve can be recomputed later. Kept small: the cell is its (dataset, row) key, the score a
# REAL (4 bytes; DuckDB has no float16), the label 0/1 in a UTINYINT; DuckDB dictionary-
# compresses the repeated run ids, splits and dataset names.
PROBE_PREDICTIONS_DDL = """CREATE TABLE IF NOT EXISTS probe_predictions (
    run_id VARCHAR NOT NULL,
    split VARCHAR NOT NULL,
    dataset VARCHAR NOT NULL,
    "row" INTEGER NOT NULL,
    score REAL NOT NULL,                -- probability of the positive class, out of fold
    label UTINYINT NOT NULL             -- 1 = positive (the run's positive_label)
)"""

DDL = [
    """CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)""",
    """CREATE TABLE datasets (
        dataset VARCHAR PRIMARY KEY,
        n_cells INTEGER NOT NULL,
        n_genes INTEGER NOT NULL,
        n_sensitive INTEGER NOT NULL,
        n_resistant INTEGER NOT NULL,
        source_path VARCHAR NOT NULL,
        source_sha256 VARCHAR NOT NULL,
        source_layer VARCHAR,               -- matrix read: NULL (X), a layer name, or '.raw'
        value_kind VARCHAR NOT NULL,        -- counts | normalized | log1p | scaled | none (embeddings-only)
        gene_id_type VARCHAR NOT NULL,      -- symbol | ensembl | none (embeddings-only)
        symbol_col VARCHAR,                 -- var column with symbols (NULL: var_names)
        ensembl_col VARCHAR,                -- var column with Ensembl IDs (NULL: var_names or none)
        label_col VARCHAR,                  -- NULL: ingested without labels
        label_map VARCHAR NOT NULL,         -- JSON: raw value -> sensitive|resistant
        sample_col VARCHAR,
        patient_col VARCHAR,
        drug VARCHAR, cancer_type VARCHAR, tissue VARCHAR, therapy VARCHAR, regimen VARCHAR,
        scdrugmap_version VARCHAR NOT NULL,
        ingested_at TIMESTAMP NOT NULL
    )""",
    """CREATE TABLE cells (
        dataset VARCHAR NOT NULL,
        "row" INTEGER NOT NULL,             -- row of this cell in every embedding array of its dataset
        obs_name VARCHAR NOT NULL,
        label VARCHAR,                      -- sensitive | resistant | NULL (unlabelled)
        label_raw VARCHAR,
        sample VARCHAR,
        patient VARCHAR,
        PRIMARY KEY (dataset, "row")
    )""",
    """CREATE TABLE provenance (
        backbone VARCHAR NOT NULL,
        dataset VARCHAR NOT NULL,
        array_path VARCHAR NOT NULL,        -- relative to embeddings.zarr/
        n_cells INTEGER NOT NULL,
        dim INTEGER NOT NULL,
        dtype VARCHAR NOT NULL,
        chunk_rows INTEGER NOT NULL,
        scdrugmap_version VARCHAR NOT NULL,
        checkpoint_sha256 VARCHAR,
        source_sha256 VARCHAR NOT NULL,
        params VARCHAR NOT NULL,            -- JSON of every preprocessing / model parameter
        created_at TIMESTAMP NOT NULL,
        origin VARCHAR NOT NULL DEFAULT 'extracted',  -- extracted (scdrugmap extract) | external (import-embeddings)
        PRIMARY KEY (backbone, dataset)
    )""",
    """CREATE TABLE probe_runs (
        run_id VARCHAR PRIMARY KEY,
        created_at TIMESTAMP NOT NULL,
        backbone VARCHAR NOT NULL,
        head VARCHAR NOT NULL,
        method VARCHAR NOT NULL,            -- frozen | lora | zero-shot
        protocol VARCHAR NOT NULL,          -- pooled | cross | zero-shot
        group_by VARCHAR NOT NULL,          -- sample | patient | dataset | none
        where_sql VARCHAR,
        seed INTEGER NOT NULL,
        positive_label VARCHAR NOT NULL,
        datasets VARCHAR[] NOT NULL,
        n_cells INTEGER NOT NULL,
        params VARCHAR NOT NULL,            -- JSON: head parameters and notes
        note VARCHAR,
        scdrugmap_version VARCHAR NOT NULL
    )""",
    """CREATE TABLE probe_results (
        run_id VARCHAR NOT NULL,
        split VARCHAR NOT NULL,             -- fold name, or the held-out dataset
        status VARCHAR NOT NULL,            -- ok | one-class-test | one-class-train | no-answer
        reason VARCHAR,
        n_train INTEGER, n_test INTEGER, n_test_positive INTEGER,
        f1 DOUBLE, macro_f1 DOUBLE, auroc DOUBLE, auprc DOUBLE, accuracy DOUBLE,
        balanced_accuracy DOUBLE, mcc DOUBLE, "precision" DOUBLE, recall DOUBLE,
        fit_seconds DOUBLE,
        PRIMARY KEY (run_id, split)
    )""",
    PROBE_PREDICTIONS_DDL,
    ZERO_SHOT_CACHE_DDL,
    MODELS_DDL,
    PREDICTIONS_DDL,
]

METRIC_COLUMNS = (
    "f1", "macro_f1", "auroc", "auprc", "accuracy", "balanced_accuracy", "mcc", "precision", "recall",
)


def check_metric(metric: str) -> str:
    """``metric`` if it is one of the stored metrics, else the one-line error naming them."""
    if metric not in METRIC_COLUMNS:
        from ..errors import UserError

        raise UserError(f"unknown metric {metric!r}: use one of {', '.join(METRIC_COLUMNS)}")
    return metric


# The ``cohort`` view: one row per cell with its dataset's context (what ``--where`` sees).
# Re-created after every ingest, because ingest may add obs columns to ``cells``.
COHORT_VIEW = (
    "CREATE OR REPLACE VIEW cohort AS SELECT c.*, "
    + ", ".join(f"d.{c}" for c in DATASET_CONTEXT_COLUMNS)
    + " FROM cells c JOIN datasets d USING (dataset)"
)
