"""One training run, the same with or without Ray: setup -> train -> test -> cleanup.

Without Ray it is ``dldkd train --no-ray`` (alone, or as N ranks with ``torchrun
--nproc-per-node N -m launch.cli train --no-ray ...`` or the ``deepspeed`` launcher);
checkpoints go to ``<run.storage>/<run.name>/checkpoints``, a folder (shared when ranks are on
several nodes) or an object store, and ``run.resume: auto`` continues from the newest complete
one there (``trainer.infra.reporting``).
"""
from __future__ import annotations

import sys

from trainer.recipe import Recipe
from trainer.infra.signals import Stopped


def train(cfg, reporter=None, device=None, use_deepspeed: bool = True):
    """setup -> train -> cleanup; the final state (best SumR, steps) is returned."""
    recipe = Recipe(cfg, reporter, device, use_deepspeed)
    recipe.setup()
    status = "FAILED"
    try:
        state = recipe.train()
        recipe.test()
        status = "FINISHED"
        return state
    except Stopped as stop:
        status = "KILLED"
        if recipe.dist.is_main:   # one resume line, not one per rank (torchrun)
            print(stop, file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    finally:
        recipe.cleanup(status)
