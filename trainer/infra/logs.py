"""Logging set-up for the entry points (the CLI, Ray workers), never done at import."""
from __future__ import annotations

import logging
import os
import sys

# Libraries whose INFO lines are routine noise in a run's log (DeepSpeed's op-compatibility
# compiler probes, MLflow's store set-up and system-metrics chatter); their warnings stay.
QUIET_LOGGERS = ("compilers", "DeepSpeed", "deepspeed", "mlflow", "torch.distributed")


def setup_logging() -> None:
    """One INFO stream for the run; routine library chatter down to warnings."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow sets its loggers' level from this variable when it is imported (here or in a
    # worker), overriding the line above; the user's own setting wins.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
