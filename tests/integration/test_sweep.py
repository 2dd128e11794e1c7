"""Sweeps: the YAML search space, the concurrency limit, trial configs, resume, results."""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from launch.report import render as report_render, stats as report_stats
from launch.jobs import sweep, sweep_spec
from trainer.config import Config, ConfigError, load_config
from trainer.infra.tags import REGISTERED_MODEL_TAG

ROOT = Path(__file__).resolve().parents[2]


def tiny() -> Config:
    return load_config(ROOT / "configs" / "tiny.yaml")


# ------------------------------------------------------------------------- search space


def test_each_domain_becomes_the_tune_domain_it_names() -> None:
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized

    space = sweep_spec.build_space({
        "optim.lr": {"loguniform": [1e-4, 1e-3]},
        "loss.kd_temp": {"uniform": [0.1, 0.5]},
        "model.inh_weight": {"quniform": [0.5, 0.9, 0.1]},
        "train.seed": {"randint": [1, 4]},
        "loss.targets": {"choice": ["soft", "hard"]},
        "loss.kd_schedule": {"grid": ["exp_down", "linear"]},
    }, tiny())
    assert isinstance(space["optim.lr"], Float)
    assert isinstance(space["optim.lr"].get_sampler(), LogUniform)
    assert isinstance(space["model.inh_weight"].get_sampler(), Quantized)
    assert isinstance(space["train.seed"], Integer)
    assert isinstance(space["loss.targets"], Categorical)
    assert space["loss.kd_schedule"] == {"grid_search": ["exp_down", "linear"]}
    sampled = ("optim.lr", "loss.kd_temp", "model.inh_weight", "train.seed", "loss.targets")
    draws = {k: list(space[k].sample(size=400, random_state=i)) for i, k in enumerate(sampled)}
    assert all(1e-4 <= v <= 1e-3 for v in draws["optim.lr"])
    # log-uniform: half the draws fall below the geometric mean (uniform would put 24% there)
    below = sum(v < math.sqrt(1e-4 * 1e-3) for v in draws["optim.lr"])
    assert 160 < below < 240
    assert all(0.1 <= v <= 0.5 for v in draws["loss.kd_temp"])
    assert all(abs(v * 10 - round(v * 10)) < 1e-9 and 0.5 <= v <= 0.9
               for v in draws["model.inh_weight"])
    assert set(draws["train.seed"]) == {1, 2, 3}  # randint's high is exclusive
    assert set(draws["loss.targets"]) == {"soft", "hard"}


@pytest.mark.parametrize("space, message", [
    ({"optim.lrr": {"uniform": [0.1, 0.2]}},
     "'optim.lrr' is not a config key; did you mean 'optim.lr'"),
    ({"optim.lr": {"gaussian": [0.1, 0.2]}}, "unknown domain 'gaussian'"),
    ({"optim.lr": {"uniform": [0.1]}}, "needs a list of 2 numbers"),
    ({"optim.lr": {"loguniform": [0.0, 1e-3]}}, "loguniform needs low > 0"),
    ({"optim.lr": {"uniform": [1e-3, 1e-4]}}, "low < high"),
    ({"optim.lr": {"uniform": [1e-3, 2.0]}}, "value 2.0 gives an invalid config"),
    ({"loss.targets": {"choice": ["soft", "medium"]}}, "value 'medium' gives an invalid config"),
    ({"train.seed": {"grid": []}}, "non-empty list"),
    ({"optim.lr": 1e-3}, "must be one domain"),
])
def test_bad_space_names_the_key(space: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="sweep.space.") as err:
        sweep_spec.build_space(space, tiny())
    assert message in str(err.value)


@pytest.mark.parametrize("raw, message", [
    ({"nmae": "x"}, "unknown sweep key(s) ['nmae']"),
    ({"name": "a/b"}, "sweep.name='a/b'"),
    ({"mode": "up"}, "sweep.mode='up'"),
    ({"num_samples": 0}, "sweep.num_samples=0"),
    ({"search_alg": "hyperopt"}, "hyperopt/bayesopt are not installed"),
    ({"scheduler": {"type": "pbt"}}, "sweep.scheduler.type='pbt'"),
    ({"scheduler": {"type": "asha", "time_attr": "training_iteration", "max_t": 8}},
     "use time_attr: step"),
    ({"scheduler": {"type": "asha"}}, "sweep.scheduler.max_t is needed"),
    ({"scheduler": {"type": "asha", "max_t": 4, "grace_period": 8}}, "exceeds max_t=4"),
    ({"scheduler": {"kind": "asha"}}, "unknown sweep.scheduler key(s) ['kind']"),
    ({"trial_cpus": 0}, "sweep.trial_cpus=0"),
    ({"search_alg": "grid", "space": {"optim.lr": {"uniform": [1e-4, 1e-3]}}},
     "['optim.lr'] are continuous"),
])
def test_bad_sweep_section_is_named(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        sweep_spec.parse_sweep(raw, tiny())
    assert message in str(err.value)


def test_grid_search_alg_turns_choices_into_grid_axes() -> None:
    spec = sweep_spec.parse_sweep({"search_alg": "grid", "space": {
        "loss.targets": {"choice": ["soft", "hard"]}, "train.seed": {"grid": [1, 2]}}}, tiny())
    assert sweep_spec.tune_space(spec, tiny()) == {
        "loss.targets": {"grid_search": ["soft", "hard"]}, "train.seed": {"grid_search": [1, 2]}}


def test_asha_max_t_defaults_to_the_run_length_in_steps() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["data.steps_per_epoch=5", "train.epochs=3"])
    spec = sweep_spec.parse_sweep({"scheduler": {"type": "asha", "grace_period": 5}}, cfg)
    assert spec.scheduler.max_t == 15
    assert spec.name == "tiny"  # the run name, when the sweep names none


def test_load_sweep_splits_config_and_sweep_overrides(tmp_path: Path) -> None:
    cfg, spec = sweep_spec.load_sweep(ROOT / "configs" / "sweep-demo.yaml", [
        "data.train=/x/train", "sweep.num_samples=3", "sweep.scheduler.type=asha",
        "sweep.scheduler.max_t=32", "sweep.name=other"])
    assert cfg.data.train == "/x/train"
    assert (spec.num_samples, spec.scheduler.type, spec.scheduler.max_t, spec.name) == (
        3, "asha", 32, "other")
    with pytest.raises(ConfigError, match="edit the YAML's sweep.space"):
        sweep_spec.load_sweep(ROOT / "configs" / "sweep-demo.yaml", ["sweep.space.optim.lr=1"])


def test_shipped_sweeps_load_with_their_documented_overrides(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg, spec = sweep_spec.load_sweep(ROOT / "configs" / "sweep-demo.yaml",
                                      [f"run.storage={tmp_path}"])
    assert spec.num_samples * len(spec.space["optim.lr"]["grid"]) == 2
    assert (cfg.dist.num_workers, spec.search_alg) == (2, "grid")
    # driver and workers share one store: by default a SQLite file in the sweep's folder
    assert sweep.tracking_uri(cfg, spec) == f"sqlite:///{tmp_path / 'demo-sweep' / 'mlflow.db'}"
    on_s3 = ["data.train=s3://b/train", "data.val=s3://b/val", "run.storage=s3://b/runs",
             "dist.use_gpu=true"]
    # with shards and runs on S3, MLflow must be a server (the k8s pods set the variable)
    with pytest.raises(ConfigError, match="tracking.uri"):
        sweep_spec.load_sweep(ROOT / "configs" / "sweep-tvr.yaml", on_s3)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    cfg, spec = sweep_spec.load_sweep(ROOT / "configs" / "sweep-tvr.yaml", on_s3)
    assert spec.scheduler.type == "asha" and spec.metric == "val/SumR"
    assert sweep.tracking_uri(cfg, spec) == "http://mlflow:5000"
    assert sweep.experiment_path(cfg, spec) == "s3://b/runs/tvr-dldkdpp-sweep"


# ------------------------------------------------------------------------- resources


def test_trial_demand_counts_the_driver_and_every_worker() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["dist.num_workers=3",
                                                       "dist.cpus_per_worker=2"])
    assert sweep.trial_demand(cfg, 0.5) == {"CPU": 6.5}
    cfg = load_config(ROOT / "configs" / "sweep-tvr.yaml", [])
    assert sweep.trial_demand(cfg, 1) == {"CPU": 33, "GPU": 4.0}


@pytest.mark.parametrize("cluster, demand, cap, expected", [
    ({"CPU": 4.0}, {"CPU": 1.5}, 0, 2),           # CPU bound: floor(4 / 1.5)
    ({"CPU": 4.0}, {"CPU": 1.5}, 1, 1),           # the sweep's own cap wins when smaller
    ({"CPU": 64.0, "GPU": 8.0}, {"CPU": 33.0, "GPU": 4.0}, 0, 1),  # CPUs bind before GPUs
    ({"CPU": 200.0, "GPU": 8.0}, {"CPU": 33.0, "GPU": 4.0}, 0, 2),  # GPUs bind
    ({"CPU": 200.0, "GPU": 8.0}, {"CPU": 33.0, "GPU": 4.0}, 5, 2),  # cap above what fits
    ({"CPU": 6.0}, {"CPU": 2.0}, 0, 3),           # exact fit, no float loss
    ({"CPU": 0.0}, {"CPU": 2.0}, 0, 1),           # head with num-cpus 0: wait for autoscaling
])
def test_concurrent_trials_fit_the_cluster(cluster, demand, cap, expected) -> None:
    assert sweep.concurrent_trials(cluster, demand, cap) == expected


# ------------------------------------------------------------------------- trial identity


def test_trial_config_applies_values_and_a_stable_identity() -> None:
    base = load_config(ROOT / "configs" / "tiny.yaml", ["tracking.registered_model=m"]).to_dict()
    cfg = sweep.trial_config(base, {"optim.lr": 2e-4, "loss.targets": "hard"}, sweep="s1",
                             trial_id="ab12_00001", storage="/r/s1/trials", uri="sqlite:///x.db",
                             parent_run_id="p123")
    assert (cfg.optim.lr, cfg.loss.targets) == (2e-4, "hard")
    assert cfg.run.name == "s1-ab12_00001" == sweep.trial_run_name("s1", "ab12_00001")
    assert (cfg.run.storage, cfg.tracking.uri, cfg.tracking.parent_run_id) == (
        "/r/s1/trials", "sqlite:///x.db", "p123")
    assert base["optim"]["lr"] == tiny().optim.lr  # the shared base is not mutated
    assert cfg.tracking.registered_model == ""  # trials register nothing: the sweep registers


def test_open_tuners_starts_new_without_an_experiment(tmp_path: Path) -> None:
    made = []
    spec = sweep_spec.parse_sweep({"search_alg": "grid", "space": {"train.seed": {"range": [1, 2]}}},
                                  tiny())
    tuners, resumed = sweep.open_tuners(str(tmp_path / "none"), lambda part: None,
                                        lambda part, points=None: made.append(part) or "new", spec)
    assert (tuners, resumed, made) == (["new"], False, [str(tmp_path / "none")])


def test_a_variant_gives_its_own_seeds_and_the_grid_is_their_points() -> None:
    spec = sweep_spec.parse_sweep({
        "search_alg": "grid", "space": {"train.seed": {"range": [1, 2]}},
        "variants": {"a": {"loss.targets": "hard"},
                     "b": {"loss.targets": "soft", "train.seed": {"range": [1, 4]}}},
        "claims": {"c": {"better": "b", "worse": "a"}}}, tiny())
    points = sweep_spec.grid_points(spec)
    # seed-major, the variants in their YAML order within a seed; b alone past seed 2
    assert [(p["train.seed"], p["variant"]) for p in points] == [
        (1, "a"), (1, "b"), (2, "a"), (2, "b"), (3, "b"), (4, "b")]
    assert sweep_spec.tune_space(spec, tiny()) == {"point": {"grid_search": points}}
    cfg = sweep.trial_config(tiny().to_dict(), {"point": points[5]}, sweep="s", trial_id="t",
                             storage="/r", uri="u", parent_run_id="p", variants=spec.variants)
    assert (cfg.train.seed, cfg.loss.targets) == (4, "soft")
    with pytest.raises(ConfigError, match=r"sweep.variants.b.train.seed: range bounds must be "
                                          r"integers"):
        sweep_spec.parse_sweep({"search_alg": "grid", "space": {"train.seed": {"range": [1, 2]}},
                                "variants": {"b": {"train.seed": {"range": [1, 2.5]}}}}, tiny())
    with pytest.raises(ConfigError, match=r"sweep.variants.b.optim.lr: only a grid axis"):
        sweep_spec.parse_sweep({"search_alg": "random",
                                "space": {"optim.lr": {"loguniform": [1e-4, 1e-3]}},
                                "variants": {"b": {"optim.lr": {"grid": [1e-3]}}}}, tiny())


# ------------------------------------------------------------------------- results


HISTORIES = {
    "s-a": [{"step": 4.0, "val/SumR": 100.0, "val/R1": 5.0, "val/R5": 20.0, "val/R10": 30.0,
             "val/R100": 45.0},
            {"step": 8.0, "val/SumR": 150.0, "val/R1": 10.0, "val/R5": 30.0, "val/R10": 40.0,
             "val/R100": 70.0},
            {"step": 12.0, "val/SumR": 120.0, "val/R1": 8.0, "val/R5": 25.0, "val/R10": 37.0,
             "val/R100": 50.0}],
    "s-b": [{"step": 4.0, "val/SumR": 160.0, "val/R1": 12.0, "val/R5": 33.0, "val/R10": 45.0,
             "val/R100": 70.0}],
    "s-c": [],  # errored before its first evaluation
    "s-d": [{"step": 4.0, "val/SumR": float("nan")}],
}


def test_trial_rows_take_each_trials_best_eval_sorted() -> None:
    rows = report_stats.trial_rows(HISTORIES, "val/SumR", "max")
    # reference: best SumR per trial by a plain loop
    best = {}
    for label, history in HISTORIES.items():
        for r in history:
            if r["val/SumR"] == r["val/SumR"] and (label not in best
                                                   or r["val/SumR"] > best[label]["val/SumR"]):
                best[label] = r
    assert [label for label, _ in rows] == sorted(best, key=lambda k: -best[k]["val/SumR"])
    assert [label for label, _ in rows] == ["s-b", "s-a"]
    a = dict(rows)["s-a"]
    assert (a["SumR"], a["R1"], a["R5"], a["R10"], a["R100"], a["step"]) == (
        150.0, 10.0, 30.0, 40.0, 70.0, 8.0)
    worst_first = report_stats.trial_rows(HISTORIES, "val/SumR", "min")
    assert [label for label, _ in worst_first] == ["s-a", "s-b"]
    assert dict(worst_first)["s-a"]["SumR"] == 100.0


def test_trials_table_and_plot(tmp_path: Path) -> None:
    rows = report_stats.trial_rows(HISTORIES, "val/SumR", "max")
    text = report_render.trials_table(rows, {"s-a": {"optim.lr": 0.0003},
                                             "s-b": {"optim.lr": 0.001}})
    lines = text.strip().splitlines()
    assert lines[0].startswith("| trial | optim.lr | R1 | R5 | R10 | R100 | SumR |")
    assert lines[2].startswith("| s-b | 0.001 | 12.00 | 33.00 | 45.00 | 70.00 | 160.00 |")
    assert lines[3].endswith("| 8 |")  # the step of s-a's best evaluation
    assert len(lines) == 4

    from matplotlib.image import imread

    path = report_render.plot_curves(report_stats.trial_curves(HISTORIES, "val/SumR"),
                                     tmp_path / "out" / "sumr.png", "val/SumR", "trials")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).shape[:2] == (450, 700)
    assert not list(path.parent.glob("*.tmp"))


# ------------------------------------------------------------------------- a real sweep


SWEEP_YAML = """
    model: {video_dim: 128, query_dim: 64, hidden: 32, heads: 4, input_drop: 0.1, drop: 0.1}
    loss: {hard_pool: 5, kd: "off", targets: hard}
    data: {val: VAL, batch_videos: 16, steps_per_epoch: 3, loader_workers: 0}
    train: {epochs: 1, log_every: 3}
    dist: {num_workers: 1, zero_stage: 0}
    tracking: {system_metrics: false, registered_model: sweep-best}
    run: {name: it, storage: STORAGE}
    sweep:
      name: resume-it
      search_alg: grid
      trial_cpus: 0.5
      space:
        train.seed: {range: [1, LAST]}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from sharding.synthetic import build_world

    out = tmp_path_factory.mktemp("world")
    build_world(out, videos=48, eval_videos=16, pretrain_pairs=0, progress=False)
    return out


@pytest.mark.slow
def test_an_errored_sweep_resumes_and_added_seeds_run_alone(world: Path, tmp_path: Path,
                                                             ray_session) -> None:
    """The trial fails (its data is missing); the rerun restores the same trial and trains it.
    Then the seed range grows by one: the next rerun keeps the finished trial (its MLflow run
    untouched) and runs only the new seed, in a second part of the experiment. MLflow keeps one
    parent and one child per trial, and the sweep registers its best trial's model."""
    from mlflow.tracking import MlflowClient

    config = tmp_path / "sweep.yaml"
    text = textwrap.dedent(SWEEP_YAML).replace("STORAGE", str(tmp_path / "runs")).replace(
        "VAL", str(world / "val"))
    config.write_text(text.replace("LAST", "1"))
    cfg, spec = sweep_spec.load_sweep(config, [f"data.train={tmp_path / 'missing'}"])
    with pytest.raises(RuntimeError, match="no trial reported val/SumR"):
        sweep.run_sweep(cfg, spec)
    first = sorted(p.name for p in (tmp_path / "runs" / "resume-it").glob("resume-it-*"))
    assert len(first) == 1

    cfg, spec = sweep_spec.load_sweep(config, [f"data.train={world / 'train'}"])
    result = sweep.run_sweep(cfg, spec)
    assert result.resumed and not result.errors
    assert sorted(label for label, _ in result.rows) == first
    assert all(m["SumR"] > 0 and m["step"] == 3 for _, m in result.rows)
    assert result.table.is_file() and result.plot.is_file()
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (kept,) = [r for r in client.search_runs([exp.experiment_id])
               if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert kept.info.run_name == first[0] and kept.info.status == "FINISHED"

    config.write_text(text.replace("LAST", "2"))
    cfg, spec = sweep_spec.load_sweep(config, [f"data.train={world / 'train'}"])
    grown = sweep.run_sweep(cfg, spec)
    assert grown.resumed and not grown.errors and len(grown.rows) == 2
    assert (tmp_path / "runs" / "resume-it.part2").is_dir()

    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.info.run_name == "resume-it"]
    assert len(parents) == 1 and parents[0].info.run_id == result.parent_run_id \
        == grown.parent_run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == grown.parent_run_id]
    assert sorted(r.data.params["train.seed"] for r in children) == ["1", "2"]
    again = client.get_run(kept.info.run_id)   # the finished trial was not trained again
    assert again.info.end_time == kept.info.end_time
    assert again.data.metrics["val/SumR"] == kept.data.metrics["val/SumR"]
    assert all(r.data.metrics["val/SumR"] == dict(grown.rows)[r.info.run_name]["SumR"]
               for r in children)
    assert {a.path for a in client.list_artifacts(grown.parent_run_id, "sweep")} == {
        "sweep/trials.md", "sweep/sumr.png"}
    # each finished launch registers its best trial's model (no data.test, so no alias)
    versions = client.search_model_versions("name = 'sweep-best'")
    newest = max(versions, key=lambda v: int(v.version))
    best = next(r for r in children if r.info.run_name == grown.rows[0][0])
    assert newest.run_id == best.info.run_id and not newest.aliases
    assert client.get_run(grown.parent_run_id).data.tags[REGISTERED_MODEL_TAG] == \
        f"models:/sweep-best/{newest.version}"


ASHA_YAML = """
    model: {video_dim: 128, query_dim: 64, hidden: 128, heads: 4, input_drop: 0.1, drop: 0.1}
    loss: {hard_pool: 5, kd: "off", targets: hard, hard_negative_start_epoch: 100}
    data: {train: TRAIN, val: VAL, batch_videos: 16, steps_per_epoch: 16, loader_workers: 0,
           true_epochs: false}
    train: {epochs: 1, log_every: 4, eval_every: 4, ckpt_every: 8, early_stop: 0}
    dist: {num_workers: 1, zero_stage: 0}
    tracking: {system_metrics: false}
    run: {name: asha, storage: STORAGE}
    sweep:
      name: asha-it
      search_alg: grid
      max_concurrent: 1
      trial_cpus: 0.5
      scheduler: {type: asha, max_t: 16, grace_period: 4, reduction_factor: 2}
      space:
        optim.lr: {grid: [1.0e-3, 1.0e-12]}
"""


@pytest.mark.slow
def test_asha_stops_a_trial_on_an_evaluation_without_a_checkpoint(world: Path, tmp_path: Path,
                                                                  ray_session) -> None:
    """Checkpoints every 8 steps, evaluations every 4: ASHA's first rung (step 4) is an
    evaluation-only report. The second trial (lr 1e-12, never learns) is below the first's
    validation SumR there and is stopped at step 4, before its first checkpoint."""
    config = tmp_path / "sweep.yaml"
    config.write_text(textwrap.dedent(ASHA_YAML).replace("STORAGE", str(tmp_path / "runs"))
                      .replace("TRAIN", str(world / "train")).replace("VAL", str(world / "val")))
    cfg, spec = sweep_spec.load_sweep(config, [])
    assert cfg.train.ckpt_every == 2 * cfg.train.eval_every
    result = sweep.run_sweep(cfg, spec)
    assert not result.errors
    trials = sorted((tmp_path / "runs" / "asha-it").glob("asha-it-*"))
    assert len(trials) == 2
    steps = {}
    for trial in trials:
        rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        steps[rows[0]["config"]["optim.lr"]] = [(r["step"], "val/SumR" in r) for r in rows]
    assert steps[1e-3] == [(4, True), (8, True), (12, True), (16, True)], steps
    assert steps[1e-12] == [(4, True)], f"ASHA did not stop the trial at step 4: {steps}"
