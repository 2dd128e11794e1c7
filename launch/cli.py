"""The ``dldkd`` command: one entry point, one subcommand per job.

Config-taking subcommands share one shape: ``--config FILE`` then ``key.sub=value`` overrides.
Heavy imports (torch, Ray, MLflow) happen inside each subcommand so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import sys

from dldkd_configs import preset


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML preset, e.g. configs/tvr.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. optim.lr=1e-4 dist.num_workers=4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dldkd", description="DL-DKD++ for Partially Relevant Video Retrieval: shards, "
        "online CLIP teacher, DeepSpeed workers on Ray, sweeps, MLflow.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    shard = sub.add_parser("shard", help="write WebDataset shards (MS-SL release or synthetic)",
                           description="Write tar shards + manifest.json that workers stream.")
    shard_sub = shard.add_subparsers(dest="source", required=True, metavar="SOURCE")
    ms = shard_sub.add_parser("msssl", help="convert the MS-SL data release (TVR, ActivityNet, "
                              "Charades-STA)", description="Convert the MS-SL release layout "
                              "(method.md §2); re-running resumes, skipping verified shards.")
    ms.add_argument("--root", required=True, help="folder holding <collection>/FeatureData, "
                    "<collection>/TextData")
    ms.add_argument("--collection", required=True, choices=["tvr", "activitynet", "charades"])
    ms.add_argument("--split", required=True, choices=["train", "val", "test"])
    ms.add_argument("--out", required=True, help="output folder for <split>-NNNNNN.tar")
    ms.add_argument("--videos-per-shard", type=int, default=500)
    ms.add_argument("--max-shard-bytes", type=int, default=None,
                    help="cut a shard when it reaches this size instead")
    ms.add_argument("--feature", default=None, help="visual feature folder name override")
    ms.add_argument("--overwrite", action="store_true", help="rewrite the whole split when "
                    "--out holds shards made from other release files or settings (refused "
                    "otherwise, so a split never mixes two datasets)")
    fr = shard_sub.add_parser("frames", help="add teacher frames decoded from raw videos to a "
                              "written split", description="Decode each video of a split (PyAV; "
                              ".mp4/.mkv/.webm/.avi named <video id>.<ext>) and write the split "
                              "again to --out with one JPEG frame per student feature step, for "
                              "the online teacher. Re-running resumes; the source shards stay "
                              "as they are. See docs/shards.md.")
    fr.add_argument("--videos", required=True, help="folder holding the video files (searched "
                    "recursively)")
    fr.add_argument("--shards", required=True, help="a split folder written by `dldkd shard`")
    fr.add_argument("--out", required=True, help="new folder for the split with frames")
    fr.add_argument("--size", type=int, default=224, help="the teacher's input size in pixels: "
                    "shortest side resized to it, then centre-cropped (224 for ViT-B-32)")
    fr.add_argument("--quality", type=int, default=90, help="JPEG quality (1-100)")
    fr.add_argument("--seconds-per-step", type=float, default=None, help="feature step i covers "
                    "[i*S, (i+1)*S) seconds (default: the steps spread evenly over each video)")
    fr.add_argument("--workers", type=int, default=None,
                    help="decoder processes (default: one per CPU)")
    fr.add_argument("--overwrite", action="store_true", help="rewrite the whole split when "
                    "--out holds frames made with other options or from another source split "
                    "(refused otherwise, so a split never mixes two)")
    syn = shard_sub.add_parser("synthetic", help="build the synthetic PRVR world",
                               description="Write train/val/test splits and an image-text "
                               "pretraining split of the synthetic world (docs/synthetic-world.md).")
    syn.add_argument("--out", required=True)
    syn.add_argument("--videos", type=int, default=600, help="training videos")
    syn.add_argument("--eval-videos", type=int, default=None, help="videos per val/test split")
    syn.add_argument("--pretrain-pairs", type=int, default=3000)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--videos-per-shard", type=int, default=100)
    syn.add_argument("--min-frames", type=int, default=16, help="shortest video, in frames")
    syn.add_argument("--max-frames", type=int, default=64,
                     help="longest video (> 128 exercises the uniform sampling to 128 steps)")
    syn.add_argument("--image-size", type=int, default=32, help="teacher frame size, pixels")
    syn.add_argument("--video-dim", type=int, default=128, help="student frame feature dim")
    syn.add_argument("--query-dim", type=int, default=64, help="caption token feature dim")
    syn.add_argument("--token-noise", type=float, default=0.35,
                     help="norm of the noise on each caption token's features (harder queries)")
    syn.add_argument("--frame-noise", type=float, default=1.2,
                     help="norm of the noise on each frame's features (harder videos)")
    syn.add_argument("--overwrite", action="store_true", help="rewrite every split when "
                     "--out holds a world of another seed or settings (refused otherwise, so a "
                     "split never mixes two worlds)")

    val = sub.add_parser("validate", help="check a config before a cluster is touched",
                         description="Config types and ranges, batch arithmetic, shards vs "
                         "workers, manifest dims vs model, teacher weights, storage; prints a "
                         "per-worker memory estimate.")
    _add_config(val)
    val.add_argument("--offline", action="store_true",
                     help="skip checks that need the data and storage (config-only)")
    val.add_argument("--deep", action="store_true",
                     help="decode every sample of every shard (default: the first and last of "
                     "each) and hash remote shards too")

    train = sub.add_parser("train", help="one run: N DeepSpeed workers under Ray Train",
                           description="A Ray Train job of dist.num_workers DeepSpeed workers "
                           "(`python -m launch.train` is the same command); a relaunch with the "
                           "same run.name resumes.")
    _add_config(train)
    train.add_argument("--address", default=None, help="Ray address (default: local)")
    train.add_argument("--no-ray", action="store_true",
                       help="run in this process without Ray: one worker on this machine "
                       "(`torchrun --nproc-per-node N -m launch.cli train --no-ray ...` "
                       "runs N)")

    sweep = sub.add_parser("sweep", help="a Ray Tune sweep of runs, one MLflow parent run",
                           description="Search space and scheduler in the YAML's `sweep:` section.")
    _add_config(sweep)
    sweep.add_argument("--address", default=None)
    sweep.add_argument("--num-cpus", type=int, default=None,
                       help="logical CPUs of the local Ray cluster (default: the machine's)")

    ev = sub.add_parser("eval", help="evaluate a checkpoint on a split",
                        description="Metrics table and a JSON report of a best/ checkpoint.")
    ev.add_argument("--checkpoint", required=True, help="a run's best/ folder (or its s3:// URI), "
                    "or an MLflow model: models:/NAME@ALIAS, models:/NAME/VERSION, "
                    "runs:/RUN_ID/model")
    ev.add_argument("--tracking-uri", default=None, help="the MLflow store of a models:/ or "
                    "runs:/ checkpoint (default: $MLFLOW_TRACKING_URI)")
    ev.add_argument("--split", required=True, help="shard folder or URL of the split")
    ev.add_argument("--out", default=None, help="write the JSON report here")
    ev.add_argument("--explain", default=None, metavar="OUT.html",
                    help="also write the retrieval explorer here: one self-contained HTML page "
                    "of the worst and best queries (docs/evaluation.md)")

    submit = sub.add_parser("submit", help="`ray job submit` this project to a cluster",
                            description="Wraps `ray job submit` with a runtime_env that excludes "
                            ".git, data and outputs; refuses a working dir over Ray's limit.")
    submit.add_argument("--address", default=None, help="dashboard address, e.g. "
                        "http://127.0.0.1:8265 (default: $RAY_ADDRESS)")
    submit.add_argument("--no-wait", action="store_true", help="return after submitting")
    entries = submit.add_subparsers(dest="entry", required=True, metavar="ENTRY")
    _add_config(entries.add_parser("train", help="python -m launch.train on the cluster"))
    _add_config(entries.add_parser("sweep", help="python -m launch.sweep on the cluster"))

    teacher = sub.add_parser("teacher", help="pretrain or evaluate the CLIP teacher alone")
    t_sub = teacher.add_subparsers(dest="action", required=True, metavar="ACTION")
    pre = t_sub.add_parser("pretrain", help="train a tiny open_clip model on image-text shards",
                           description="Contrastive pretraining of a small open_clip config on "
                           "the synthetic world's pretraining split.")
    pre.add_argument("--shards", required=True, help="image-text shard folder (pretrain/)")
    pre.add_argument("--model-config", default=preset("teacher-tiny.json"),
                     help="open_clip JSON model config (default: the shipped teacher-tiny.json)")
    pre.add_argument("--arch", default="teacher-tiny")
    pre.add_argument("--out", required=True, help="checkpoint file to write (.pt)")
    pre.add_argument("--steps", type=int, default=300)
    pre.add_argument("--batch", type=int, default=128)
    pre.add_argument("--lr", type=float, default=1e-3)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--save-at", type=int, nargs="*", default=[],
                     help="also save checkpoints at these steps (teacher-quality studies)")
    tev = t_sub.add_parser("eval", help="the teacher's own zero-shot PRVR metrics on a split")
    _add_config(tev)
    tev.add_argument("--split", required=True, help="shard folder of the split")

    demo = sub.add_parser("demo", help="the whole system on this machine, in minutes",
                          description="Synthetic world -> tiny teacher -> a 2-trial sweep of "
                          "2 DeepSpeed workers on a local Ray cluster -> MLflow (SQLite).")
    demo.add_argument("--out", default="outputs/demo")
    demo.add_argument("--small", action="store_true", help="reduced size (CI)")

    report = sub.add_parser("report", help="Markdown report of a sweep from MLflow",
                            description="Ablation table (mean +- std over seeds), the sweep's "
                            "claims with their 95%% CIs and a power table (seeds needed), "
                            "teacher-quality plot, training curves, compute cost; logged to the "
                            "parent run.")
    group = report.add_mutually_exclusive_group(required=True)
    group.add_argument("--sweep", help="sweep name (the MLflow parent run)")
    group.add_argument("--experiment", help="an MLflow experiment name")
    report.add_argument("--tracking-uri", default=None)
    report.add_argument("--out", default=None, help="report folder")
    report.add_argument("--resolve", type=float, default=2.0, metavar="SUMR",
                        help="the SumR difference the power table plans paired seeds for: "
                        "seeds for a 95%% CI half-width of SUMR (default 2)")
    return parser


def user_error(exc: BaseException) -> BaseException | None:
    """The error a user can fix (bad config, YAML, data, checkpoint, teacher weights), also when
    it reaches us wrapped by Ray or re-raised from another; None for anything else (a bug)."""
    from sharding.reader import BadDataError

    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, (ValueError, FileNotFoundError, BadDataError)):
            return exc
        exc = exc.__cause__ or getattr(exc, "cause", None) or exc.__context__
        seen += 1
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from launch import commands

    handler = getattr(commands, f"cmd_{args.command}")
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        print(f"dldkd {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted into the user's errors and bugs below
        known = user_error(exc)
        if known is None or args.debug:
            raise
        # The user's to fix: one message naming the file, key or shard, not a traceback.
        print(f"dldkd {args.command}: error: {known}\n(run with --debug for the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
