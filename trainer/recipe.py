"""One worker's training run: setup, train, save, cleanup (the loop reads top to bottom).

The same recipe runs under Ray Train (``launch.train``), under ``torchrun``/``deepspeed``
(``python -m trainer.run``) and alone. Where it differs (where checkpoints go, how they are
reported) is the ``Reporter`` it is given; the recipe itself never imports Ray.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from trainer import checkpoint as ckpt
from trainer import dist
from trainer.config import Config, save_yaml
from trainer.engine import build_engine
from trainer.losses import total_loss
from trainer.metrics import EvalGallery, build_gallery, encode_gallery, rank_counts, rank_metrics
from trainer.schedules import kd_weight, soft_alpha, soft_beta
from trainer.student import DualStudent
from trainer.tracking import Tracker, resolve_uri

log = logging.getLogger("dldkd")


class Reporter(Protocol):
    """Where checkpoints go and how a finished one is announced (Ray or plain files)."""

    def restore_dir(self) -> Path | None: ...
    def staging_dir(self, step: int) -> Path: ...
    def report(self, metrics: dict, staged: Path | None, step: int) -> None: ...


class LocalReporter:
    """Checkpoints on a (shared) file system: ``<storage>/<name>/checkpoints/step-N``."""

    def __init__(self, root: Path, is_main: bool, resume: str = "auto"):
        self.root, self.is_main, self.resume = Path(root), is_main, resume

    def restore_dir(self) -> Path | None:
        if self.resume == "never":
            return None
        found = ckpt.latest(self.root)
        if found is None and self.resume == "must":
            raise FileNotFoundError(f"run.resume=must but no checkpoint under {self.root}")
        return found

    def staging_dir(self, step: int) -> Path:
        return ckpt.step_dir(self.root, step).with_suffix(".tmp")

    def report(self, metrics: dict, staged: Path | None, step: int) -> None:
        dist.barrier()  # every rank has finished writing its part
        if staged is not None and self.is_main:
            ckpt.publish(staged, ckpt.step_dir(self.root, step))
        dist.barrier()


def run_dir(cfg: Config) -> Path:
    """The run's local folder (config, best weights, MLflow spool); a temp folder when
    ``run.storage`` is a URI (checkpoints then go to the URI through Ray, best weights to MLflow)."""
    if "://" in cfg.run.storage:
        return Path(tempfile.gettempdir()) / "dldkd" / cfg.run.name
    return Path(cfg.run.storage) / cfg.run.name


class Recipe:
    def __init__(self, cfg: Config, reporter: Reporter | None = None,
                 device: torch.device | None = None, use_deepspeed: bool = True, *,
                 reader=None, gallery: EvalGallery | None = None):
        """``reader``/``gallery`` replace the shards (anything with ``steps_per_epoch`` and
        ``epoch(e, start_step)``), to debug the method on in-memory data."""
        self.cfg = cfg
        self.device_hint = device
        self.use_deepspeed = use_deepspeed
        self.reporter = reporter
        self.reader = reader
        self.gallery = gallery

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self.started = time.perf_counter()
        self.dist = dist.init(cfg.dist.use_gpu, cfg.dist.timeout_s, self.device_hint)
        self.device = self.dist.device
        self.dtype = torch.bfloat16 if cfg.dist.precision == "bf16" else torch.float32
        _seed_everything(cfg.train.seed + self.dist.rank, cfg.train.deterministic)
        self.generator = torch.Generator().manual_seed(cfg.train.seed + 7919 * self.dist.rank)
        self.dir = run_dir(cfg)
        if self.reporter is None:
            self.reporter = LocalReporter(self.dir / "checkpoints", self.dist.is_main,
                                          cfg.run.resume)

        from sharding.reader import ShardReader

        self.reader = self.reader or ShardReader(
            cfg.data.train, rank=self.dist.rank, world_size=self.dist.world_size,
            batch_videos=cfg.data.batch_videos, loader_workers=cfg.data.loader_workers,
            resampled=cfg.data.resampled, steps_per_epoch=cfg.data.steps_per_epoch,
            seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
            max_bad_fraction=cfg.data.max_bad_fraction, max_words=cfg.model.max_words,
            video_dim=cfg.model.video_dim, query_dim=cfg.model.query_dim,
            teacher_frames=cfg.uses_teacher() and cfg.teacher.placement != "precomputed")
        self.steps_per_epoch = self.reader.steps_per_epoch
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        if self.gallery is None and cfg.data.val:
            self.gallery = self._load_gallery(cfg.data.val)

        self.student = DualStudent(cfg.model)
        self.engine = build_engine(cfg, self.student, self.total_steps, self.dist.world_size,
                                   self.use_deepspeed)
        self.teacher = None
        if cfg.uses_teacher():
            from trainer.teacher import build_teacher

            self.teacher = build_teacher(cfg.teacher, self.device)

        self.tracker = Tracker(
            resolve_uri(cfg.tracking.uri, self.dir), cfg.tracking.experiment, cfg.run.name,
            self.dir / "mlflow-spool.jsonl", enabled=self.dist.is_main,
            parent_run_id=cfg.tracking.parent_run_id,
            system_metrics=cfg.tracking.system_metrics)
        self.state = ckpt.TrainState()
        self._restore()
        node_ranks = dist.gather_ints(self.dist.node_rank, self.dist.world_size)
        if self.dist.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, self.dir / "config.yaml")
            self.tracker.start(cfg.flat(), {"dldkd.world_size": str(self.dist.world_size),
                                            "dldkd.node_ranks": json.dumps(node_ranks)})
            self.tracker.log_artifact(self.dir / "config.yaml")

    def _load_gallery(self, source: str) -> EvalGallery:
        from sharding.reader import read_all

        samples = read_all(source, teacher_frames=False)  # the teacher never evaluates
        if self.cfg.train.max_eval_queries:
            samples = _cap_queries(samples, self.cfg.train.max_eval_queries)
        return build_gallery(samples, self.cfg.model.max_words)

    def _restore(self) -> None:
        found = self.reporter.restore_dir()
        if found is None:
            return
        _, client = self.engine.load_checkpoint(str(found), ckpt.ENGINE_TAG)
        if client.get("world_size") != self.dist.world_size:
            raise RuntimeError(
                f"checkpoint {found} was written by {client.get('world_size')} workers, this run "
                f"has {self.dist.world_size}: resuming on a different worker count is not "
                "supported; relaunch with dist.num_workers equal to the original")
        self.state = ckpt.TrainState.from_dict(client["train_state"])
        ckpt.set_rng_state(ckpt.load_rank_rng(found, self.dist.rank), self.generator)
        log.info("resumed from %s at step %d (epoch %d)", found, self.state.step, self.state.epoch)

    # ---------------------------------------------------------------- train
    def train(self) -> ckpt.TrainState:
        cfg, st = self.cfg, self.state
        eval_every = cfg.train.eval_every or self.steps_per_epoch
        ckpt_every = cfg.train.ckpt_every or eval_every
        timer = _Timer()
        # A progress bar only where someone watches (rank 0 on a terminal); logs elsewhere.
        bar = tqdm(total=self.total_steps, initial=st.step, unit="step", dynamic_ncols=True,
                   disable=not (self.dist.is_main and sys.stderr.isatty()))
        self.engine.train()
        while st.epoch < cfg.train.epochs and not st.stopped_early:
            batches = self.reader.epoch(st.epoch, st.step_in_epoch)
            while st.step_in_epoch < self.steps_per_epoch:
                with timer("data"):
                    batch = next(batches)
                terms = self.train_step(batch, st.epoch, timer)
                st.step += 1
                st.step_in_epoch += 1
                bar.update(1)
                timer.count(batch.num_videos * self.dist.world_size)
                if st.step % cfg.train.log_every == 0 or st.step == 1:
                    self._log_step(terms, timer)
                metrics = None
                if st.step % eval_every == 0 or st.step == self.total_steps:
                    metrics = self.evaluate_and_track()
                if st.step % ckpt_every == 0 or st.stopped_early or st.step == self.total_steps:
                    self.save(metrics or {"step": st.step})
                if st.stopped_early:
                    break
            batches.close()
            if st.step_in_epoch >= self.steps_per_epoch:
                st.epoch += 1
                st.step_in_epoch = 0
        bar.close()
        return st

    def schedule(self, epoch: int) -> dict[str, float]:
        loss = self.cfg.loss
        out = {"epoch": float(epoch)}
        if loss.kd == "dynamic":
            out["lambda"] = kd_weight(epoch, loss.kd_schedule)
        elif loss.kd == "static":
            out["lambda"] = loss.kd_static_weight
        if loss.targets == "soft":
            out["alpha"], out["beta"] = soft_alpha(epoch), soft_beta(epoch)
        return out

    def train_step(self, batch, epoch: int, timer: "_Timer") -> dict[str, float]:
        batch = _to_device(batch, self.device, self.dtype)
        targets = None
        if self.teacher is not None:
            with timer("teacher"):
                targets = self.teacher.targets(batch)
        with timer("student"):
            scores = self.engine(batch)
            if self.cfg.dist.precision == "bf16":
                scores = {k: type(v)(*(t.float() for t in v)) for k, v in scores.items()}
            loss, terms = total_loss(scores, batch.labels, targets, self.cfg.loss, epoch,
                                     self.generator)
            if not math.isfinite(terms["loss"]):
                raise FloatingPointError(
                    f"loss became {terms['loss']} at step {self.state.step} (epoch {epoch}); "
                    "lower optim.lr or check the input features")
            self.engine.backward(loss)
            self.engine.step()
        return terms

    def evaluate_and_track(self) -> dict[str, float]:
        """Gallery metrics (work shared across ranks), early stopping on SumR, best weights."""
        st = self.state
        if self.gallery is None:
            return {}
        metrics = self.evaluate(self.gallery)
        improved = metrics["SumR"] > st.best_sumr
        if improved:
            st.best_sumr, st.best_step, st.bad_evals = metrics["SumR"], st.step, 0
            self._save_best(metrics)
        else:
            st.bad_evals += 1
            if self.cfg.train.early_stop and st.bad_evals >= self.cfg.train.early_stop:
                st.stopped_early = True
        st.history.append({"step": st.step, "SumR": metrics["SumR"]})
        out = {f"val/{k}": v for k, v in metrics.items()}
        out.update({"val/best_SumR": st.best_sumr, "step": st.step, "epoch": st.epoch})
        self.tracker.log_metrics(out, st.step)
        if self.dist.is_main:
            log.info("eval step %d: %s (best SumR %.2f at step %d)%s", st.step,
                     " ".join(f"{k}={v:.2f}" for k, v in metrics.items()), st.best_sumr,
                     st.best_step, " early stop" if st.stopped_early else "")
        return out

    @torch.no_grad()
    def evaluate(self, gallery: EvalGallery) -> dict[str, float]:
        with _gathered(self.engine, self.cfg.dist.zero_stage):
            enc = encode_gallery(self.student, gallery, device=self.device)
        n = enc.num_queries
        lo = n * self.dist.rank // self.dist.world_size
        hi = n * (self.dist.rank + 1) // self.dist.world_size
        ranks = torch.zeros(n, dtype=torch.int64)
        if hi > lo:
            ranks[lo:hi] = rank_counts(enc, slice(lo, hi))
        return rank_metrics(dist.all_reduce_sum(ranks))

    # ---------------------------------------------------------------- save
    def save(self, metrics: dict) -> None:
        st = self.state
        staged = self.reporter.staging_dir(st.step)
        staged.mkdir(parents=True, exist_ok=True)
        client = {"train_state": st.to_dict(), "world_size": self.dist.world_size,
                  "schedule": self.schedule(st.epoch)}
        self.engine.save_checkpoint(str(staged), ckpt.ENGINE_TAG, client_state=client)
        ckpt.save_rank_rng(staged, self.dist.rank, ckpt.rng_state(self.generator))
        if self.dist.is_main:
            ckpt.write_client_json(staged, st, client["schedule"])
        self.reporter.report(metrics, staged, st.step)

    def _save_best(self, metrics: dict) -> None:
        with _gathered(self.engine, self.cfg.dist.zero_stage):
            if self.dist.is_main:
                best = self.dir / "best"
                best.mkdir(parents=True, exist_ok=True)
                weights = {k: v.detach().float().cpu() for k, v in self.student.state_dict().items()}
                tmp = best / "student.pt.tmp"
                torch.save(weights, tmp)
                tmp.replace(best / "student.pt")
                save_yaml(self.cfg, best / "config.yaml")
                (best / "metrics.json").write_text(
                    json.dumps({"step": self.state.step, **metrics}, indent=1))

    def test(self) -> dict[str, float]:
        """The best weights on the test split, once, on rank 0; logged as ``test/*``."""
        best = self.dir / "best"
        if not (self.cfg.data.test and self.dist.is_main and (best / "student.pt").is_file()):
            return {}
        from trainer.evaluate import evaluate_checkpoint

        report = evaluate_checkpoint(best, self.cfg.data.test)
        tmp = best / "test_report.json.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(best / "test_report.json")
        self.tracker.log_metrics({f"test/{k}": v for k, v in report["metrics"].items()},
                                 self.state.step)
        self.tracker.log_artifact(best / "test_report.json", "best")
        log.info("test (best weights, step %d): %s", self.state.best_step,
                 " ".join(f"{k}={v:.2f}" for k, v in report["metrics"].items()))
        return report["metrics"]

    # ---------------------------------------------------------------- cleanup
    def cleanup(self, status: str = "FINISHED") -> None:
        if self.dist.is_main:
            st = self.state
            summary = {"best_SumR": st.best_sumr, "best_step": st.best_step,
                       "steps": st.step, "stopped_early": float(st.stopped_early),
                       "perf/wall_s": time.perf_counter() - self.started}
            self.tracker.log_metrics(summary, st.step)
            if st.history:
                _plot_history(st.history, self.dir / "best" / "val_sumr.png", self.cfg.run.name)
            for name in ("metrics.json", "config.yaml", "student.pt", "val_sumr.png"):
                if (self.dir / "best" / name).exists():
                    self.tracker.log_artifact(self.dir / "best" / name, "best")
            self.tracker.set_tags({"dldkd.best_checkpoint": str((self.dir / "best").resolve())})
            self.tracker.finish(status)

    def _log_step(self, terms: dict, timer: "_Timer") -> None:
        st = self.state
        rates = timer.rates()
        remaining = (self.total_steps - st.step) * rates["step_s"]
        metrics = {f"train/{k}": v for k, v in terms.items()}
        metrics.update({"train/lr": self.engine.get_lr()[0], "perf/samples_s": rates["samples_s"],
                        "perf/data_wait_pct": rates["data_pct"],
                        "perf/teacher_pct": rates["teacher_pct"],
                        "perf/teacher_ms": rates["teacher_ms"], "epoch": st.epoch})
        self.tracker.log_metrics(metrics, st.step)
        if self.dist.is_main:
            parts = " ".join(f"{k}={v:.4f}" for k, v in terms.items())
            log.info("step %d/%d ep %d | %s | lr %.2e | %.1f samples/s | data %.0f%% | teacher "
                     "%.0f%% | ETA %s", st.step, self.total_steps, st.epoch, parts,
                     self.engine.get_lr()[0], rates["samples_s"], rates["data_pct"],
                     rates["teacher_pct"], _fmt_eta(remaining))
        timer.reset()


class _Timer:
    """Wall time per phase since the last log line (data wait, teacher, student)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.phases = {"data": 0.0, "teacher": 0.0, "student": 0.0}
        self.samples = 0
        self.steps = 0

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] += time.perf_counter() - start

    def count(self, samples: int) -> None:
        self.samples += samples
        self.steps += 1

    def rates(self) -> dict[str, float]:
        wall = max(time.perf_counter() - self.t0, 1e-9)
        steps = max(self.steps, 1)
        return {"samples_s": self.samples / wall, "step_s": wall / steps,
                "data_pct": 100 * self.phases["data"] / wall,
                "teacher_pct": 100 * self.phases["teacher"] / wall,
                "teacher_ms": 1000 * self.phases["teacher"] / steps}


def _gathered(engine, stage: int):
    """Gather ZeRO-3 partitioned student weights for evaluation and saving (no-op otherwise)."""
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()))


def _plot_history(history: list[dict], path: Path, title: str) -> None:
    """Validation SumR over steps: the evaluation report's plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([h["step"] for h in history], [h["SumR"] for h in history], marker="o")
    ax.set(xlabel="step", ylabel="validation SumR", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _to_device(batch, device: torch.device, dtype: torch.dtype):
    """Move a batch to the rank's device; student inputs in the engine's precision."""
    for name in ("video_feats", "query_feats"):
        setattr(batch, name, getattr(batch, name).to(device, dtype, non_blocking=True))
    if device.type == "cpu":
        return batch
    for name in ("video_mask", "query_mask", "labels", "teacher_index", "teacher_frames",
                 "teacher_frame_emb", "teacher_text_emb"):
        value = getattr(batch, name)
        if value is not None:
            setattr(batch, name, value.to(device, non_blocking=True))
    return batch


def _cap_queries(samples, max_queries: int):
    out, total = [], 0
    for s in samples:
        if total >= max_queries:
            break
        out.append(s)
        total += len(s.cap_ids)
    return out


def _seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
