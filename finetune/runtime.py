"""Process-wide set-up for commands and workers that load the ML stack."""

from __future__ import annotations

import os


def quiet_libraries() -> None:
    """Silence the libraries' own progress bars and warnings: `finetune` shows its own progress."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # MLflow sets its loggers' level as it is imported
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "torch", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # MLflow's SQL store logs a failed write with its traceback, then raises it to finetune, which says it in one
    # line (a full disk, a moved folder): its own record would only repeat it.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    except ImportError:
        pass


def freeze_long_lived_objects() -> None:
    """Move every object alive now (libraries, resident models) out of the garbage collector's scans.

    Without this every collection rescans every object of torch, transformers and the loaded models.
    """
    import gc

    gc.collect()
    gc.freeze()
