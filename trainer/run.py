"""One training run without Ray: ``python -m trainer.run --config C [key=value ...]``.

Start it alone, or as N ranks with ``torchrun --nproc-per-node N -m trainer.run ...`` or the
``deepspeed`` launcher; checkpoints go to ``<run.storage>/<run.name>/checkpoints`` (a shared file
system when ranks are on several nodes) and ``run.resume: auto`` continues from the latest.
"""
from __future__ import annotations

import argparse
import sys

from trainer.config import load_config
from trainer.recipe import Recipe, Stopped, setup_logging


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
        print(stop, file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    finally:
        recipe.cleanup(status)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML preset (configs/*.yaml)")
    parser.add_argument("--no-deepspeed", action="store_true",
                        help="plain PyTorch engine (single process debugging)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    setup_logging()
    train(load_config(args.config, args.overrides), use_deepspeed=not args.no_deepspeed)


if __name__ == "__main__":
    main()
