"""One worker's training run: setup, train, save, cleanup (the loop reads top to bottom).

The same recipe runs under Ray Train (``launch.train``), under ``torchrun``/``deepspeed``
(``dldkd train --no-ray``) and alone. Where it differs (where checkpoints go, how they are
reported) is the ``Reporter`` it is given; the recipe itself never imports Ray.

It is over 400 lines because it is one concern, the loop's order: setup and restore, the step,
evaluation, saving and cleanup call each other and share the loop's state; what stands alone
(losses, schedules, checkpoints' files, tracking, stopping on signals, plots) lives in its own
module.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import time

import torch
from tqdm import tqdm

from sharding.splits import val_is_test
from trainer import checkpoint as ckpt
from trainer.infra import best, mlflow_model, storage
from trainer import dist
from trainer.config import RESUMABLE, Config, ConfigError, resume_changes, save_yaml
from trainer.engine import build_engine
from trainer.method.losses import total_loss
from trainer.method.metrics import EvalGallery, build_gallery, encode_gallery, rank_counts, rank_metrics
from trainer.method.optim import seek
from trainer.method.schedules import LossWeights, loss_weights, schedule_epoch
from trainer.method.student import DualStudent
from trainer.infra.progress import PhaseTimer, fmt_eta, plot_history
from trainer.infra.reporting import LocalReporter, Reporter
from trainer.infra.signals import Stopped, StopOnSignals
from trainer.infra.tracking import Tracker, resolve_uri
from trainer.infra.tags import (BEST_CHECKPOINT_TAG, NODE_RANKS_TAG, RESUME_CHANGED_PREFIX,
                                   VAL_IS_TEST_TAG, WORLD_SIZE_TAG)

log = logging.getLogger("dldkd")


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
        # The student's input dtype: DeepSpeed's bf16 holds the module in bf16; without DeepSpeed
        # bf16 is autocast over float32 weights (trainer/engine.PlainEngine).
        self.dtype = torch.bfloat16 if cfg.dist.precision == "bf16" and self.use_deepspeed \
            else torch.float32
        _seed_everything(cfg.train.seed + self.dist.rank, cfg.train.deterministic)
        # On the device, so the loss's random draws need no host-to-device copy.
        self.generator = torch.Generator(device=self.device).manual_seed(
            cfg.train.seed + 7919 * self.dist.rank)
        # Scratch on this node (spool, a cached best/); durable files under the run's storage.
        self.dir = storage.local_run_dir(cfg.run.storage, cfg.run.name)
        self.best_uri = storage.join(storage.run_location(cfg.run.storage, cfg.run.name), "best")
        if self.reporter is None:
            self.reporter = LocalReporter(
                storage.join(storage.run_location(cfg.run.storage, cfg.run.name), "checkpoints"),
                self.dist.is_main, cfg.run.resume, self.dir / "checkpoints", self.dist.local_rank)

        from sharding.reader import ShardReader, resident_plan, resolve_source

        if self.reader is None:
            teacher_frames = cfg.uses_teacher() and cfg.teacher.placement != "precomputed"
            resident, why = resident_plan(
                resolve_source(cfg.data.train)[1], mode=cfg.data.resident,
                max_mb=cfg.data.resident_max_mb, true_epochs=cfg.data.true_epochs,
                teacher_frames=teacher_frames)
            log.info("training data: %s", why)
            self.reader = ShardReader(
                cfg.data.train, rank=self.dist.rank, world_size=self.dist.world_size,
                batch_videos=cfg.data.batch_videos, loader_workers=cfg.data.loader_workers,
                resampled=cfg.data.resampled, steps_per_epoch=cfg.data.steps_per_epoch,
                seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                max_bad_fraction=cfg.data.max_bad_fraction, max_words=cfg.model.max_words,
                video_dim=cfg.model.video_dim, query_dim=cfg.model.query_dim,
                teacher_frames=teacher_frames, true_epochs=cfg.data.true_epochs,
                resident=resident)
        self.steps_per_epoch = self.reader.steps_per_epoch
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        if self.gallery is None and cfg.data.val:
            self.gallery = self._load_gallery(cfg.data.val)

        self.student = DualStudent(cfg.model, check_inputs=cfg.train.debug)
        self.engine = build_engine(cfg, self.student, self.total_steps, self.dist.world_size,
                                   self.use_deepspeed)
        self.teacher = None
        if cfg.uses_teacher():
            from trainer.teacher.model import build_teacher

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
            self.tracker.start(cfg.flat(), {WORLD_SIZE_TAG: str(self.dist.world_size),
                                            NODE_RANKS_TAG: json.dumps(node_ranks)})
            self.tracker.log_artifact(self.dir / "config.yaml")
            if self.resumed_changes:   # params keep their first values; the changes are tags
                log.info("resuming with changed %s", ", ".join(
                    f"{k} {old!r} -> {new!r}" for k, (old, new) in self.resumed_changes.items()))
                self.tracker.set_tags({RESUME_CHANGED_PREFIX + k: f"{old!r} -> {new!r}"
                                       for k, (old, new) in self.resumed_changes.items()})
            val_note = val_is_test(cfg.data.val, cfg.data.test)
            if val_note:
                log.warning(val_note)
                self.tracker.set_tags({VAL_IS_TEST_TAG: "true"})

    def _load_gallery(self, source: str) -> EvalGallery:
        from sharding.reader import read_all

        samples = read_all(source, teacher_frames=False)  # the teacher never evaluates
        if self.cfg.train.max_eval_queries:
            samples = _cap_queries(samples, self.cfg.train.max_eval_queries)
        return build_gallery(samples, self.cfg.model.max_words)

    def _restore(self) -> None:
        self.resumed_changes: dict[str, tuple] = {}
        found = self.reporter.restore_dir()
        if found is None:
            return
        client_json = ckpt.read_client_json(found)
        written_by = client_json.get("world_size", self.dist.world_size)
        resized = written_by != self.dist.world_size
        if resized and self.cfg.dist.zero_stage == 3:
            raise ckpt.CheckpointError(
                f"checkpoint {found} was written by {written_by} workers, this run has "
                f"{self.dist.world_size}: a ZeRO-3 checkpoint resumes only on the worker count "
                "that wrote it (DeepSpeed re-partitions it only through a universal checkpoint, "
                f"which it cannot load weights-only); relaunch with dist.num_workers={written_by}"
                " and dist.min_workers=0")
        saved = client_json.get("config")
        if saved is not None:
            self.resumed_changes, refused = resume_changes(saved, self.cfg.flat())
            if refused:
                diff = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
                raise ConfigError(
                    f"run.name={self.cfg.run.name!r} already has checkpoint {found} written with "
                    f"another config ({diff}). Resuming may change only {', '.join(RESUMABLE)}; "
                    "give this config a new run.name, or undo the change to resume")
        if resized and self.cfg.dist.zero_stage:
            client = ckpt.load_repartitioned(self.engine, found, written_by)
        else:   # ZeRO-0 keeps the whole optimizer state in the model-states file
            _, client = self.engine.load_checkpoint(str(found), ckpt.ENGINE_TAG)
        self.state = ckpt.TrainState.from_dict(client["train_state"])
        if resized:
            self._resume_resized(written_by)
        else:
            ckpt.set_rng_state(ckpt.load_rank_rng(found, self.dist.rank), self.generator)
        log.info("resumed from %s at step %d (epoch %d)", found, self.state.step, self.state.epoch)

    def _resume_resized(self, written_by: int) -> None:
        """Continue a checkpoint of ``written_by`` workers on this run's worker count: the epoch
        goes on after the samples it consumed (``ckpt.resized_position``), the schedules at that
        position, and every rank draws fresh random streams (the checkpoint's belong to the
        ranks of the old count)."""
        cfg, st, world = self.cfg, self.state, self.dist.world_size
        st.epoch, st.step_in_epoch = ckpt.resized_position(
            st.epoch, st.step_in_epoch, written_by, world, self.steps_per_epoch)
        _seed_everything(cfg.train.seed + self.dist.rank + 104729 * st.step,
                         cfg.train.deterministic)
        self.generator.manual_seed(cfg.train.seed + 7919 * self.dist.rank + 104729 * st.step)
        seek(self.engine.lr_scheduler, self.position // cfg.dist.grad_accum)
        log.info("checkpoint of %d workers resumed on %d: epoch %d goes on at its step %d of %d",
                 written_by, world, st.epoch, st.step_in_epoch, self.steps_per_epoch)

    @property
    def position(self) -> int:
        """Steps into the run's schedule: the step counter, less the difference a resume on
        another worker count made (its epochs have another number of steps)."""
        return self.state.epoch * self.steps_per_epoch + self.state.step_in_epoch

    # ---------------------------------------------------------------- train
    def train(self) -> ckpt.TrainState:
        cfg, st = self.cfg, self.state
        eval_every = cfg.train.eval_every or self.steps_per_epoch
        ckpt_every = cfg.train.ckpt_every or eval_every
        timer = PhaseTimer()
        # A progress bar only where someone watches (rank 0 on a terminal); logs elsewhere.
        bar = tqdm(total=self.total_steps, initial=self.position, unit="step", dynamic_ncols=True,
                   disable=not (self.dist.is_main and sys.stderr.isatty()))
        self.engine.train()
        # The first step whose loss was not finite, kept on the device and read only where the
        # loop reads values anyway (log, eval, checkpoint), so no step waits for the device.
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        with StopOnSignals(cfg.train.stop_grace_s, self.reporter.stop_requested,
                           self.tracker.mark_killed) as stop:
            self._loop(timer, bar, eval_every, ckpt_every, stop)
        bar.close()
        return st

    def _loop(self, timer: "PhaseTimer", bar, eval_every: int, ckpt_every: int,
              stop: "StopOnSignals") -> None:
        cfg, st = self.cfg, self.state
        while st.epoch < cfg.train.epochs and not st.stopped_early:
            batches = self.reader.epoch(st.epoch, st.step_in_epoch)
            while st.step_in_epoch < self.steps_per_epoch:
                with timer("data"):
                    batch = next(batches)
                weights = self.weights()
                terms = self.train_step(batch, weights, timer)
                st.step += 1
                st.step_in_epoch += 1
                bar.update(1)
                timer.count(batch.num_videos * self.dist.world_size)
                at = self.position
                evaluate = at % eval_every == 0 or at == self.total_steps
                save = at % ckpt_every == 0 or at == self.total_steps
                if st.step % cfg.train.log_every == 0 or st.step == 1 or evaluate or save:
                    self._raise_if_diverged()
                    if stop.agreed():   # a signal on any rank: log, save, stop every rank
                        self._log_step(terms, weights, timer)
                        self.save({"step": st.step})
                        raise Stopped(stop.signum, st.step, cfg.run.name)
                if st.step % cfg.train.log_every == 0 or st.step == 1:
                    self._log_step(terms, weights, timer)
                metrics = None
                if evaluate:
                    metrics = self.evaluate_and_track()
                if save or st.stopped_early:
                    self.save(metrics or {"step": st.step})
                elif metrics:  # Tune and early stopping hear every evaluation
                    self.reporter.report(metrics, None, st.step)
                if st.stopped_early:
                    break
            batches.close()
            if st.step_in_epoch >= self.steps_per_epoch:
                st.epoch += 1
                st.step_in_epoch = 0

    def weights(self) -> LossWeights:
        """This step's lambda/alpha/beta (one pure function of the config and progress)."""
        cfg, st = self.cfg, self.state
        at = schedule_epoch(st.epoch, self.position, self.total_steps, cfg.loss)
        return loss_weights(cfg.loss, st.epoch, at, inheritance="inh" in self.student.branch_names)

    def train_step(self, batch, weights: LossWeights, timer: "PhaseTimer") -> dict[str, torch.Tensor]:
        """One optimiser step; returns the loss terms as device tensors (no host sync)."""
        batch = _to_device(batch, self.device, self.dtype)
        targets = None
        if self.teacher is not None:
            with timer("teacher"):
                targets = self.teacher.targets(batch)
        with timer("student"):
            scores = self.engine(batch)
            loss, terms = total_loss(scores, batch.labels, batch.video_mask, targets,
                                     self.cfg.loss, weights, self.generator,
                                     check=self.cfg.train.debug)
            bad = ~torch.isfinite(terms["loss"]) & (self.first_bad_step < 0)
            self.first_bad_step = torch.where(bad, self.state.step + 1, self.first_bad_step)
            self.engine.backward(loss)
            self.engine.step()
        return terms

    def _raise_if_diverged(self) -> None:
        """Stop at the first read after a non-finite loss, before it is logged or saved."""
        bad = int(self.first_bad_step.item())
        if bad >= 0:
            raise FloatingPointError(
                f"loss became non-finite at step {bad} (noticed at step {self.state.step}, "
                f"epoch {self.state.epoch}); lower optim.lr or check the input features")

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
            enc = encode_gallery(self.student, gallery, video_chunk=self.cfg.data.eval_batch_videos,
                                 device=self.device, dtype=self.dtype)
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
        # The engine keeps the position of the next step (read back on resume); client.json
        # records it too, with what a relaunch checks before loading (config, worker count) and
        # the schedule values. An epoch's last step saves as the next epoch's start, so that a
        # resume on another worker count (other steps per epoch) starts that epoch whole.
        at = st if st.step_in_epoch < self.steps_per_epoch else dataclasses.replace(
            st, epoch=st.epoch + 1, step_in_epoch=0)
        self.engine.save_checkpoint(str(staged), ckpt.ENGINE_TAG,
                                    client_state={"train_state": at.to_dict()})
        ckpt.save_rank_rng(staged, self.dist.rank, ckpt.rng_state(self.generator))
        if self.dist.is_main:
            ckpt.write_client_json(staged, at, self.weights().as_dict(), self.cfg.flat(),
                                   self.dist.world_size)
        self.reporter.report(metrics, staged, st.step)

    def _save_best(self, metrics: dict) -> None:
        with _gathered(self.engine, self.cfg.dist.zero_stage):
            if self.dist.is_main:
                weights = {k: v.detach().float().cpu() for k, v in self.student.state_dict().items()}
                best.save(self.best_uri, self.dir / "best", weights, self.cfg.to_dict(),
                          {"step": self.state.step, **metrics})

    def test(self) -> dict[str, float]:
        """The best weights on the test split, once, on rank 0; logged as ``test/*``.

        The weights come from run storage when this node lacks them (a restart elsewhere); the
        report goes next to them."""
        if not (self.cfg.data.test and self.dist.is_main and self.state.best_step >= 0):
            return {}
        from trainer.evaluate import explain_checkpoint

        folder = best.local_copy(self.best_uri, self.dir / "best", self.state.best_step)
        report, page = explain_checkpoint(folder, self.cfg.data.test, name=self.best_uri)
        report["checkpoint"] = self.best_uri
        best.put(self.best_uri, folder, "test_report.json", json.dumps(report, indent=1).encode())
        best.put(self.best_uri, folder, "explorer.html", page.encode())   # docs/evaluation.md
        self.tracker.log_artifact(folder / "explorer.html", "best")
        self.tracker.log_metrics({f"test/{k}": v for k, v in report["metrics"].items()},
                                 self.state.step)
        self.tracker.log_artifact(folder / "test_report.json", "best")
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
            self._publish_best()
            if self.tracker.finish(status) and status == "FINISHED" and st.best_step >= 0:
                mlflow_model.publish(self.tracker, self.dir / "best", self.cfg.tracking, st.step)

    def _publish_best(self) -> None:
        """The SumR plot next to the best weights; both to MLflow; the tag names where they are."""
        folder = self.dir / "best"
        try:
            if self.state.best_step >= 0:
                best.local_copy(self.best_uri, folder, self.state.best_step)
            if self.state.history:
                plot_history(self.state.history, folder / "val_sumr.png", self.cfg.run.name)
                best.put(self.best_uri, folder, "val_sumr.png",
                         (folder / "val_sumr.png").read_bytes())
        except OSError as err:  # cleanup also runs after failures: report, do not mask them
            log.warning("could not publish the best weights of %s: %s", self.best_uri, err)
        for name in ("metrics.json", "config.yaml", "student.pt", "val_sumr.png"):
            if (folder / name).exists():
                self.tracker.log_artifact(folder / name, "best")
        if self.state.best_step >= 0:
            self.tracker.set_tags({BEST_CHECKPOINT_TAG: self.best_uri})

    def _log_step(self, terms: dict[str, torch.Tensor], weights: LossWeights,
                  timer: "PhaseTimer") -> None:
        st = self.state
        rates = timer.rates()
        remaining = (self.total_steps - self.position) * rates["step_s"]
        values = torch.stack([t.double() for t in terms.values()]).tolist()  # one sync
        w = weights.as_dict()
        terms = {**dict(zip(terms, values)), "lambda": w["lambda"], "alpha": w["alpha"],
                 "beta": w["beta"]}
        metrics = {f"train/{k}": v for k, v in terms.items()}
        metrics["train/schedule_epoch"] = w["epoch"]
        metrics.update({"train/lr": self.engine.get_lr()[0], "perf/samples_s": rates["samples_s"],
                        "perf/data_wait_pct": rates["data_pct"],
                        "perf/teacher_pct": rates["teacher_pct"],
                        "perf/data_ms": rates["data_ms"], "perf/teacher_ms": rates["teacher_ms"],
                        "perf/student_ms": rates["student_ms"], "epoch": st.epoch})
        metrics.update(self._data_health())
        self.tracker.log_metrics(metrics, st.step)
        if self.dist.is_main:
            parts = " ".join(f"{k}={v:.4f}" for k, v in terms.items())
            log.info("step %d/%d ep %d | %s | lr %.2e | %.1f samples/s | data %.0f%% | teacher "
                     "%.0f%% | ETA %s", st.step, st.step + self.total_steps - self.position,
                     st.epoch, parts,
                     self.engine.get_lr()[0], rates["samples_s"], rates["data_pct"],
                     rates["teacher_pct"], fmt_eta(remaining))
        timer.reset()

    def _data_health(self) -> dict[str, float]:
        """Damaged data skipped so far and the teacher cache's hit rate, summed over ranks, so
        that loss below data.max_bad_fraction shows in MLflow. A collective: every rank calls it."""
        counts = self.reader.counts() if hasattr(self.reader, "counts") else [0, 0, 0]
        cache = getattr(self.teacher, "cache", None)
        hits, misses = (cache.stats.hits, cache.stats.misses) if cache is not None else (0, 0)
        samples, bad, bad_shards, hits, misses = dist.all_reduce_sum(
            torch.tensor([*counts, hits, misses], dtype=torch.float64)).tolist()
        out = {"data/bad_samples": bad, "data/bad_shards": bad_shards,
               "data/bad_fraction": bad / max(samples + bad, 1)}
        if cache is not None:
            out["teacher/cache_hit_rate"] = hits / max(hits + misses, 1)
        return out


def _gathered(engine, stage: int):
    """Gather ZeRO-3 partitioned student weights for evaluation and saving (no-op otherwise)."""
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()))


def _to_device(batch, device: torch.device, dtype: torch.dtype):
    """Move a batch to the rank's device; student inputs in the engine's precision.

    ``teacher_index`` and ``teacher_frames`` stay on the host: the teacher's cache is keyed
    there and moves only the frames it has to encode."""
    for name in ("video_feats", "query_feats"):
        setattr(batch, name, getattr(batch, name).to(device, dtype, non_blocking=True))
    if device.type == "cpu":
        return batch
    for name in ("video_mask", "query_mask", "labels", "video_rows", "query_rows",
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
