"""Logging set-up for the entry points (the CLI, Ray workers), never done at import.

A run's log keeps dldkd's lines and every real warning, and drops the libraries' routine chatter:
INFO lines of libraries that log through the root logger (open_clip, once per worker), their
INFO-level loggers (DeepSpeed, MLflow) and progress bars, a deprecation FutureWarning DeepSpeed's
ZeRO triggers on every step, and ANSI colour codes where the output is saved rather than shown on
a terminal. (Ray's own processes are set up in launch/jobs/ray_setup.py.)
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# Libraries whose INFO lines are routine noise in a run's log (DeepSpeed's op-compatibility
# compiler probes, MLflow's store set-up and system-metrics chatter); their warnings stay.
QUIET_LOGGERS = ("compilers", "DeepSpeed", "deepspeed", "mlflow", "torch.distributed")
# Libraries that log with ``logging.info(...)``, i.e. through the root logger: their INFO lines
# are dropped by a filter on the root logger; their warnings stay.
QUIET_ROOT_CALLERS = ("open_clip",)
# torch deprecates the collectives DeepSpeed's ZeRO-2/3 call on every step; the warning is about
# DeepSpeed's code, not the run's, and repeats once a step.
DEEPSPEED_DEPRECATIONS = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` " \
    r"is deprecated"


class QuietCallers(logging.Filter):
    """Drops records below WARNING logged from the files of the given packages."""

    def __init__(self, packages: tuple[str, ...]):
        super().__init__()
        self.folders = tuple(f"{os.sep}{p}{os.sep}" for p in packages)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(
            f in record.pathname for f in self.folders)


def setup_logging() -> None:
    """One INFO stream for the run; routine library chatter down to warnings."""
    plain_output()
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if not any(isinstance(f, QuietCallers) for f in root.filters):
        root.addFilter(QuietCallers(QUIET_ROOT_CALLERS))
    warnings.filterwarnings("ignore", DEEPSPEED_DEPRECATIONS, FutureWarning)
    # MLflow sets its loggers' level from this variable when it is imported (here or in a
    # worker), overriding the line above; the user's own setting wins. Its artifact progress
    # bars are carriage-return animations, unreadable in a saved log.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def plain_output() -> None:
    """Off a terminal (a log file, ``kubectl logs``), no ANSI colour codes: Ray's driver prints
    its workers' lines with coloured prefixes (RAY_COLOR_PREFIX=0 turns those off) and colours a
    few more ("[repeated Nx across cluster]", the dashboard address), and MLflow colours some of
    its warnings, so stdout and stderr drop the codes there. A terminal keeps its colours; a
    stream that is already replaced (a test's capture) is left alone."""
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is getattr(sys, f"__{name}__") and not stream.isatty():
            setattr(sys, name, PlainText(stream))


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class PlainText:
    """A text stream that drops ANSI escape sequences on the way through."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(ANSI.sub("", text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)
