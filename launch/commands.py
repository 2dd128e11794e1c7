"""What each ``dldkd`` subcommand does (the parser is in launch/cli.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_shard(args: argparse.Namespace) -> int:
    """Shards and manifests to ``--out``, a folder or an object store (``s3://...``): written in
    this node's cache of that location, then uploaded one put per file, manifests last."""
    from trainer.infra import storage

    out = args.out
    with storage.mirrored(out, under=args.split if args.source == "msssl" else "") as local:
        if args.source == "msssl":
            from sharding.msssl import convert

            manifest = convert(args.root, args.collection, args.split, local,
                               visual_feature=args.feature,
                               videos_per_shard=args.videos_per_shard,
                               max_shard_bytes=args.max_shard_bytes, overwrite=args.overwrite)
        elif args.source == "frames":
            from sharding.frames import add_frames

            manifest = add_frames(args.shards, args.videos, local, size=args.size,
                                  quality=args.quality, seconds_per_step=args.seconds_per_step,
                                  workers=args.workers, overwrite=args.overwrite)
        else:
            from sharding.synthetic import WorldConfig, build_world

            world = WorldConfig(video_dim=args.video_dim, query_dim=args.query_dim,
                                image_size=args.image_size, min_frames=args.min_frames,
                                max_frames=args.max_frames, token_noise=args.token_noise,
                                frame_noise=args.frame_noise)
            splits = build_world(local, videos=args.videos, eval_videos=args.eval_videos,
                                 seed=args.seed, pretrain_pairs=args.pretrain_pairs, cfg=world,
                                 videos_per_shard=args.videos_per_shard,
                                 overwrite=args.overwrite)
    if args.source == "msssl":
        print(f"wrote {len(manifest.shards)} shards to {storage.join(out, args.split)}")
    elif args.source == "frames":
        _report_frames(manifest, out)
    else:
        _report_world(args, world, splits, local, out)
    return 0


def _report_world(args: argparse.Namespace, world, splits, local: Path, out: str) -> None:
    from sharding.synthetic import World

    for split in splits:
        print(f"{split}: {_join(out, split)}")
    for split in ("val", "test"):
        print(f"{split}: {_world_bounds(World(args.seed, world), local / split)}")


def _join(base: str, name: str) -> str:
    from trainer.infra import storage

    return storage.join(base, name)


def _world_bounds(world, split: Path) -> str:
    """Where a trained student can land on a split: the training-free concept oracle (it knows
    the concepts, not the noise) and chance (a random ranking of the split's videos)."""
    import torch

    from sharding.reader import read_all
    from sharding.synthetic import oracle_scores
    from trainer.method.metrics import rank_metrics, ranks_from_scores

    scores, gt = oracle_scores(world, read_all(str(split), teacher_frames=False))
    oracle = rank_metrics(ranks_from_scores(torch.from_numpy(scores), torch.from_numpy(gt)))
    n = scores.shape[1]
    chance = sum(100 * min(k, n) / n for k in (1, 5, 10, 100))
    return (f"concept oracle SumR {oracle['SumR']:.1f} (R1 {oracle['R1']:.1f}, R100 "
            f"{oracle['R100']:.1f}), chance SumR {chance:.1f} over {n} videos")


def _report_frames(manifest, out: str) -> None:
    problems = {vid: why[len("frames: "):] for vid, why in manifest.skipped["ids"].items()
                if why.startswith("frames: ")}
    for vid, why in list(problems.items())[:20]:
        print(f"skipped {vid}: {why}")
    if len(problems) > 20:
        print(f"... {len(problems) - 20} more in {_join(out, 'manifest.json')} (skipped)")
    counts = ", ".join(f"{n} {kind}" for kind, n in manifest.notes["frames"]["skipped"].items())
    print(f"wrote {len(manifest.shards)} shards, {manifest.totals['videos']} videos with frames, "
          f"to {out} (skipped: {counts})")


def cmd_validate(args: argparse.Namespace) -> int:
    from launch.validate.checks import validate_run

    report = validate_run(args.config, args.overrides, offline=args.offline, deep=args.deep)
    print(report.render())
    return 0 if report.ok else 1


def cmd_train(args: argparse.Namespace) -> int:
    if args.no_ray:
        import contextlib
        import os

        from launch.jobs.lease import run_lease
        from trainer.config import load_config
        from trainer.infra.logs import setup_logging

        from launch.validate.preflight import preflight

        setup_logging()
        cfg = load_config(args.config, args.overrides)
        preflight(cfg)   # validate's cheap checks, on every rank, before any work
        # One launch per run: rank 0 holds the lease (under torchrun the other ranks wait for
        # rank 0 to join the process group, and torchrun stops them when it fails), taken
        # before torch and DeepSpeed are imported.
        lease = run_lease(cfg.run.storage, cfg.run.name) \
            if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
        with lease:
            from trainer.run import train

            state = train(cfg)
        print(f"best SumR {state.best_sumr:.2f} at step {state.best_step}")
        return 0
    from launch.jobs.train import run

    run(args)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from launch.jobs.sweep import run

    run(args)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from trainer.evaluate import evaluate_checkpoint, format_table

    from trainer.infra import storage
    from trainer.infra.mlflow_model import checkpoint_folder

    # models:/ and runs:/ URIs are downloaded to a temporary best/ folder for the evaluation.
    with checkpoint_folder(args.checkpoint, args.tracking_uri) as checkpoint:
        if args.explain:   # the same metrics, and the explorer page of docs/evaluation.md
            from trainer.evaluate import explain_checkpoint

            report, page = explain_checkpoint(checkpoint, args.split, name=args.checkpoint)
        else:
            report = evaluate_checkpoint(checkpoint, args.split)
    report["checkpoint"] = args.checkpoint
    print(format_table({"checkpoint": report["metrics"]}))
    if args.out:
        storage.write_bytes(storage.absolute(args.out), json.dumps(report, indent=1).encode())
        print(f"report: {args.out}")
    if args.explain:
        storage.write_bytes(storage.absolute(args.explain), page.encode())
        print(f"explorer: {args.explain}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from launch.jobs.submit import submit

    return submit(args.entry, args.config, args.overrides, address=args.address,
                  wait=not args.no_wait)


def cmd_teacher(args: argparse.Namespace) -> int:
    if args.action == "pretrain":
        _local_only("--out", args.out, "teacher pretrain", "a .pt file")
        from trainer.teacher.pretrain import pretrain

        result = pretrain(args.shards, out_path=args.out, arch=args.arch,
                          model_config=args.model_config, steps=args.steps, batch_size=args.batch,
                          lr=args.lr, seed=args.seed, save_at=args.save_at)
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=1))
        return 0
    from trainer.config import load_config
    from trainer.evaluate import format_table
    from trainer.teacher.pretrain import zero_shot_eval_split

    cfg = load_config(args.config, args.overrides)
    metrics = zero_shot_eval_split(cfg, args.split)
    print(format_table({f"teacher {cfg.teacher.arch}": metrics}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from launch.jobs.demo import run_demo

    _local_only("--out", args.out, "demo", "a folder")

    return run_demo(args.out, small=args.small)


def cmd_report(args: argparse.Namespace) -> int:
    from launch.report.build import write_report

    _local_only("--out", args.out, "report", "a folder")

    if not args.resolve > 0:
        raise ValueError(f"--resolve {args.resolve:g}: the SumR difference to plan for must be "
                          "> 0 (e.g. --resolve 2)")
    path = write_report(sweep=args.sweep, experiment=args.experiment,
                        tracking_uri=args.tracking_uri, out=args.out, resolve=args.resolve)
    print(f"report: {path}")
    return 0


def _local_only(flag: str, value, command: str, what: str) -> None:
    """Refuse a URL where a command writes local files (never a local folder named ``s3:``)."""
    if value is not None and "://" in str(value):
        raise ValueError(f"{flag} {value}: dldkd {command} writes {what} on this machine, not to "
                         "an object store; give a local path and copy it there after (e.g. "
                         "`aws s3 cp --recursive`)")
