"""What each ``dldkd`` subcommand does (the parser is in launch/cli.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sharding.files import write_atomic


def cmd_shard(args: argparse.Namespace) -> int:
    if args.source == "msssl":
        from sharding.msssl import convert

        manifest = convert(args.root, args.collection, args.split, args.out,
                           visual_feature=args.feature, videos_per_shard=args.videos_per_shard,
                           max_shard_bytes=args.max_shard_bytes, overwrite=args.overwrite)
        print(f"wrote {len(manifest.shards)} shards to {Path(args.out) / args.split}")
        return 0
    if args.source == "frames":
        return _shard_frames(args)
    from sharding.synthetic import World, WorldConfig, build_world

    world = WorldConfig(video_dim=args.video_dim, query_dim=args.query_dim,
                        image_size=args.image_size, min_frames=args.min_frames,
                        max_frames=args.max_frames, token_noise=args.token_noise,
                        frame_noise=args.frame_noise)
    out = build_world(args.out, videos=args.videos, eval_videos=args.eval_videos, seed=args.seed,
                      pretrain_pairs=args.pretrain_pairs, cfg=world,
                      videos_per_shard=args.videos_per_shard, overwrite=args.overwrite)
    for split in out:
        print(f"{split}: {Path(args.out) / split}")
    for split in ("val", "test"):
        print(f"{split}: {_world_bounds(World(args.seed, world), Path(args.out) / split)}")
    return 0


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


def _shard_frames(args: argparse.Namespace) -> int:
    from sharding.frames import add_frames

    manifest = add_frames(args.shards, args.videos, args.out, size=args.size,
                          quality=args.quality, seconds_per_step=args.seconds_per_step,
                          workers=args.workers, overwrite=args.overwrite)
    problems = {vid: why[len("frames: "):] for vid, why in manifest.skipped["ids"].items()
                if why.startswith("frames: ")}
    for vid, why in list(problems.items())[:20]:
        print(f"skipped {vid}: {why}")
    if len(problems) > 20:
        print(f"... {len(problems) - 20} more in {Path(args.out) / 'manifest.json'} (skipped)")
    counts = ", ".join(f"{n} {kind}" for kind, n in manifest.notes["frames"]["skipped"].items())
    print(f"wrote {len(manifest.shards)} shards, {manifest.totals['videos']} videos with frames, "
          f"to {args.out} (skipped: {counts})")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from launch.validate.checks import validate_run

    report = validate_run(args.config, args.overrides, offline=args.offline)
    print(report.render())
    return 0 if report.ok else 1


def cmd_train(args: argparse.Namespace) -> int:
    if args.no_ray:
        from trainer.config import load_config
        from trainer.infra.logs import setup_logging
        from trainer.run import train

        setup_logging()
        state = train(load_config(args.config, args.overrides))
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

    report = evaluate_checkpoint(args.checkpoint, args.split)
    print(format_table({"checkpoint": report["metrics"]}))
    if args.out:
        out = write_atomic(args.out, json.dumps(report, indent=1))
        print(f"report: {out}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from launch.jobs.submit import submit

    return submit(args.entry, args.config, args.overrides, address=args.address,
                  wait=not args.no_wait)


def cmd_teacher(args: argparse.Namespace) -> int:
    if args.action == "pretrain":
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

    return run_demo(args.out, small=args.small)


def cmd_report(args: argparse.Namespace) -> int:
    from launch.report.build import write_report

    path = write_report(sweep=args.sweep, experiment=args.experiment,
                        tracking_uri=args.tracking_uri, out=args.out)
    print(f"report: {path}")
    return 0
