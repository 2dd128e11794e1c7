"""What a checkpoint holds besides the engine: the loop's position, RNG states, best-so-far.

Checkpoints are folders ``<ckpt_root>/step-00000100/`` holding the engine's files under the tag
``state`` plus ``client.json`` (human-readable position); a folder is complete once it is renamed
from its ``.tmp`` name, and ``latest`` names the newest complete one. RNG states are stored as
tensors and lists only, so ``torch.load(weights_only=True)`` can read every file we write.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sharding.files import atomic_path, write_atomic

ENGINE_TAG = "state"


class CheckpointError(ValueError):
    """A checkpoint file cannot be trusted or read; the message names it and what to do."""


def _deepspeed_classes() -> list:
    """The only classes DeepSpeed's own checkpoint files name besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path, map_location=None):
    """``torch.load(weights_only=True)`` with DeepSpeed's state classes allowed; a file that
    names anything else (a pickled payload) is refused before any of it runs."""
    try:
        with torch.serialization.safe_globals(_deepspeed_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever torch.load raises, the file is unusable
        named = re.search(r"Unsupported global: GLOBAL [\w.]+", str(err))
        why = named.group(0) if named else f"{type(err).__name__}: {str(err)[:200]}"
        raise CheckpointError(
            f"refused to load checkpoint file {path} ({why}). It holds objects other than "
            "tensors and DeepSpeed's state, or is damaged; dldkd never writes such files. "
            "Delete that checkpoint folder (training resumes from the previous one) or set "
            "run.resume=never to start over") from None


def weights_only_resume(engine) -> None:
    """Route every file a DeepSpeed engine's ``load_checkpoint`` reads through
    :func:`load_weights_only` (DeepSpeed's own engine unpickles with ``weights_only=False``)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location)

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise CheckpointError(f"unexpected DeepSpeed checkpoint engine "
                              f"{type(engine.checkpoint_engine).__name__}: remove "
                              "checkpoint_engine settings from the DeepSpeed config")
    engine.checkpoint_engine = WeightsOnly(engine._config)


def load_repartitioned(engine, folder: Path, written_by: int) -> dict:
    """Load a ZeRO-1/2 checkpoint written by ``written_by`` ranks into an engine of another
    rank count; returns the client state.

    DeepSpeed loads ZeRO optimizer state only on the rank count that wrote it, or from a
    universal checkpoint, whose converter unpickles without ``weights_only``. Each rank's
    ZeRO file names the slice of every parameter its flat partition holds, so a parameter's
    full fp32 value and moments are those slices joined in rank order; every new rank copies
    its own slices into its partition, then the weights are gathered from the fp32 values.
    """
    _, client = engine.load_checkpoint(str(folder), ENGINE_TAG, load_optimizer_states=False)
    full: dict[str, dict[str, list]] = {}   # state key -> parameter name -> slices in rank order
    steps: dict[int, torch.Tensor] = {}
    for rank in range(written_by):
        found = sorted((Path(folder) / ENGINE_TAG).glob(
            f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
        if not found:
            raise CheckpointError(f"checkpoint {folder} lacks the ZeRO optimizer file of rank "
                                  f"{rank} of {written_by}: it is incomplete; delete it to "
                                  "resume from the previous one")
        sd = load_weights_only(found[0], map_location="cpu")["optimizer_state_dict"]
        base = sd["base_optimizer_state"]["state"]
        for group, mapping in enumerate(sd["param_slice_mappings"]):
            flats = {"fp32": sd["single_partition_of_fp32_groups"][group]}
            for key, value in base.get(group, {}).items():
                if value.dim() == 1:
                    flats[key] = value
                else:   # a per-group count (AdamW's step), the same on every rank
                    steps[group] = value
            for key, flat in flats.items():
                for name, at in mapping.items():
                    full.setdefault(key, {}).setdefault(name, []).append(
                        flat.narrow(0, at.start, at.numel))
    params = dict(engine.module.named_parameters())
    optimizer = engine.optimizer.optimizer   # the client optimizer over flat fp32 partitions
    for group, param_group in enumerate(optimizer.param_groups):
        flat = param_group["params"][0]
        values = {key: flat.data if key == "fp32" else torch.zeros_like(flat) for key in full}
        for name, param in params.items():
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None or mapping.param_group_index != group:
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            for key, value in values.items():
                whole = torch.cat(full[key][name])
                if whole.numel() != param.numel():
                    raise CheckpointError(f"checkpoint {folder}: the ZeRO files hold "
                                          f"{whole.numel()} values of {name}, the model has "
                                          f"{param.numel()}; resume on {written_by} workers")
                value.narrow(0, hp.start, hp.numel).copy_(whole.narrow(0, lp.start, lp.numel))
        for key, value in values.items():
            if key != "fp32":
                optimizer.state[flat][key] = value
        if group in steps:
            optimizer.state[flat]["step"] = steps[group].clone()
        # The schedule's position is loaded; the rate it set lives in the optimizer state.
        param_group["lr"] = engine.lr_scheduler.get_last_lr()[group]
    engine.optimizer.update_lp_params()
    return client


@dataclass
class TrainState:
    """The loop's position and early-stopping bookkeeping (saved as client state)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_sumr: float = -1.0
    best_step: int = -1
    bad_evals: int = 0
    stopped_early: bool = False
    history: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _to_lists(random.getstate()),
        "generator": generator.get_state(),
        # Dropout on a GPU draws from the device's own generator.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_to_tuples(state["python"]))
    generator.set_state(state["generator"])
    if state.get("cuda") is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


def save_rank_rng(folder: Path, rank: int, state: dict) -> None:
    """Each rank's RNG streams (DeepSpeed keeps only rank 0's client state)."""
    with atomic_path(folder / f"rng-rank{rank}.pt") as tmp:
        torch.save(state, tmp)


def load_rank_rng(folder: Path, rank: int) -> dict:
    path = Path(folder) / f"rng-rank{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: checkpoint {folder} is incomplete; delete "
                                "that folder to resume from the previous one")
    return load_weights_only(path, map_location="cpu")


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def resized_position(epoch: int, step_in_epoch: int, written_by: int, world_size: int,
                     steps_per_epoch: int) -> tuple[int, int]:
    """(epoch, step in it) where a checkpoint of ``written_by`` workers goes on with
    ``world_size``: after the samples its epoch consumed, step k of N workers becoming step
    k * N // M of M, so fewer than one global batch of M is read twice; the next epoch once
    this epoch's steps at M are used up."""
    step = step_in_epoch * written_by // world_size
    return (epoch, step) if step < steps_per_epoch else (epoch + 1, 0)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (``latest`` pointer, else a scan)."""
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "client.json").is_file():
            return candidate
    done = sorted(p for p in root.glob("step-*") if not p.name.endswith((".tmp", ".old"))
                  and (p / "client.json").is_file())
    return done[-1] if done else None


def publish(tmp_dir: Path, final_dir: Path, keep: int = 2) -> None:
    """Make a fully written checkpoint visible (rename), point ``latest`` at it, prune old ones.

    A folder of the same step already there (a rerun of that step) is moved aside first and
    removed only once the new one is in place, so a crash at any point leaves one complete copy.
    """
    aside = final_dir.with_name(final_dir.name + ".old")
    if final_dir.exists():
        shutil.rmtree(aside, ignore_errors=True)
        final_dir.rename(aside)
    tmp_dir.rename(final_dir)
    shutil.rmtree(aside, ignore_errors=True)
    write_atomic(final_dir.parent / "latest", final_dir.name)
    done = sorted(p for p in final_dir.parent.glob("step-*")
                  if not p.name.endswith((".tmp", ".old")))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def write_client_json(folder: Path, state: TrainState, schedule: dict, config: dict,
                      world_size: int) -> None:
    """The position, schedule values, flat config and worker count of a checkpoint, readable
    before loading it (a relaunch checks its config and worker count against these first)."""
    payload = {"state": state.to_dict(), "schedule": schedule, "config": config,
               "world_size": world_size}
    write_atomic(folder / "client.json", json.dumps(payload, indent=1))


def read_client_json(folder: Path) -> dict:
    path = Path(folder) / "client.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path} ({err}): the checkpoint is incomplete or "
                              "damaged; delete that folder to resume from the previous one"
                              ) from None
