"""``dldkd report`` on a small finished sweep fabricated in a SQLite MLflow store.

The runs are written by the code paths real runs use (the sweep's parent tracker,
``label_trial_run``, the trainer's ``Tracker`` with the flattened config), so they carry the same
tags, params and metrics as a real ablation sweep; only the numbers are made up.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from launch.report import build as report, runs as report_mlflow, render as report_render, stats as report_stats
from launch.jobs import sweep, sweep_spec
from launch.cli import main as cli
from trainer.infra.tracking import Tracker

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"

# variant -> per seed: (val SumR history over steps 10, 20, 30; test SumR or None; teacher SumR)
RUNS = {
    "exploration_only": [([100.0, 150.0, 140.0], 150.0, None), ([110.0, 160.0, 165.0], 160.0, None),
                         ([90.0, 170.0, 120.0], 170.0, None)],
    "dldkdpp": [([120.0, 180.0, 175.0], 180.0, 181.0), ([130.0, 190.0, 185.0], 186.0, 181.0),
                ([125.0, 185.0, 186.0], 183.0, 181.0)],
    "dldkdpp_teacher10": [([100.0, 140.0, 150.0], 140.0, 115.0),
                          ([100.0, 150.0, 150.0], 150.0, 115.0)],  # a seed never finished
    "dldkd": [([100.0, 175.0, 170.0], None, 181.0)],  # no test split: best val is reported
}
STEPS = (10, 20, 30)


def fabricate(tmp: Path, name: str, runs: dict) -> str:
    """A finished sweep ``name`` in the SQLite store under ``tmp``; returns the tracking URI."""
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg, spec = sweep_spec.load_sweep(ROOT / "configs" / "ablation.yaml",
                                      [f"run.storage={tmp}", f"sweep.name={name}"])
    parent = sweep._parent_tracker(cfg, spec, uri)
    for variant, seeds in runs.items():
        for seed, (history, test, teacher) in enumerate(seeds, 1):
            trial = sweep.trial_config(
                cfg.to_dict(), {sweep_spec.VARIANT_KEY: variant, "train.seed": seed}, sweep=name,
                trial_id=f"{variant}_{seed}", storage=str(tmp / "trials"), uri=uri,
                parent_run_id=parent.run_id, variants=spec.variants)
            sweep.label_trial_run(trial, variant, None)
            run = Tracker(uri, trial.tracking.experiment, trial.run.name,
                          tmp / "trials" / trial.run.name / "spool.jsonl",
                          parent_run_id=parent.run_id)
            run.start(trial.flat(), {"dldkd.world_size": "1"})
            if teacher is not None:
                run.log_metrics({"teacher/SumR": teacher, "teacher/R1": teacher / 10}, 0)
            for step, sumr in zip(STEPS, history):
                run.log_metrics({"perf/teacher_ms": 0.0 if variant == "exploration_only"
                                 else 40.0 + step, "perf/samples_s": 100.0 + step,
                                 "perf/data_ms": 5.0, "perf/student_ms": 100.0 + step}, step)
                # R@k carry the SumR so the best-eval row can be checked column by column
                run.log_metrics({"val/SumR": sumr, "val/R1": sumr / 10, "val/R5": sumr / 5,
                                 "val/R10": sumr / 4, "val/R100": sumr / 2}, step)
            if test is not None:
                run.log_metrics({"test/SumR": test, "test/R1": test / 10, "test/R5": test / 5,
                                 "test/R10": test / 4, "test/R100": test / 2}, STEPS[-1])
            run.log_metrics({"perf/wall_s": 60.0 * seed, "best_SumR": max(history)}, STEPS[-1])
            run.finish()
    # a trial the scheduler stopped before it logged anything
    stopped = sweep.trial_config(cfg.to_dict(), {sweep_spec.VARIANT_KEY: "dldkdpp_teacher10",
                                                  "train.seed": 3}, sweep=name, trial_id="x_3",
                                 storage=str(tmp / "trials"), uri=uri,
                                 parent_run_id=parent.run_id, variants=spec.variants)
    sweep.label_trial_run(stopped, "dldkdpp_teacher10", None)
    sweep._close_stale_children(uri, parent.run_id)
    parent.finish()
    return uri


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("sweep")
    uri = fabricate(tmp, "abl", RUNS)
    fabricate(tmp, "other", {"dldkd": RUNS["dldkd"]})  # a second sweep in the same store
    return uri


def rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the Markdown table under ``## heading``."""
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in cells] for cells in lines[2:]]


def table(text: str, heading: str) -> dict[str, list[str]]:
    """First cell -> the other cells (first cells unique)."""
    body = rows(text, heading)
    assert len({r[0] for r in body}) == len(body)
    return {r[0]: r[1:] for r in body}


def pm(values: list[float]) -> str:
    """Reference mean ± sample std, written out from the formula."""
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return f"{mean:.1f}"
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return f"{mean:.1f} ± {std:.1f}"


@pytest.mark.slow
def test_report_of_a_finished_sweep(store: str, tmp_path: Path, capsys) -> None:
    from mlflow.tracking import MlflowClient

    out = tmp_path / "rep"
    assert cli(["report", "--sweep", "abl", "--tracking-uri", store, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out / 'report.md'}"
    text = (out / "report.md").read_text()

    ablation = table(text, "Ablation")
    assert {k: int(v[0]) for k, v in ablation.items()} == {
        "exploration_only": 3, "dldkdpp": 3, "dldkdpp_teacher10": 2, "dldkd": 1}
    for variant, seeds in RUNS.items():
        n, source, r1, r5, r10, r100, sumr = ablation[variant]
        tests = [t for _, t, _ in seeds]
        if all(t is not None for t in tests):
            assert source == "test" and sumr == pm(tests)
            assert r1 == pm([t / 10 for t in tests]) and r100 == pm([t / 2 for t in tests])
        else:  # the best validation evaluation: its SumR and the R@k of the same step
            best = [max(h) for h, _, _ in seeds]
            assert source == "val" and sumr == pm(best) and r10 == pm([b / 4 for b in best])
    assert list(ablation) == ["dldkdpp", "dldkd", "exploration_only", "dldkdpp_teacher10"]

    baseline = f"{pm([150.0, 160.0, 170.0])} (3)"
    assert rows(text, "Teacher quality") == [  # one series, by the teacher's quality
        ["dldkdpp", "teacher-step10.pt", "115.0", f"{pm([140.0, 150.0])} (2)", baseline, "-15.0"],
        ["dldkdpp", "teacher.pt", "181.0", f"{pm([180.0, 186.0, 183.0])} (3)", baseline, "+23.0"]]
    cost = table(text, "Compute cost")
    assert cost["exploration_only"][:3] == ["3", "5.0", "0.0"]
    # medians over steps 10/20/30: teacher 50/60/70 ms, student 110/120/130 ms
    assert cost["dldkdpp"][1:] == ["5.0", "60.0", "120.0", "120.0", "120", "6.0"]
    runs = table(text, "Runs")
    assert len(runs) == 10 and [v[2] for v in runs.values()].count("KILLED") == 1

    for png in ("curves.png", "teacher_quality.png"):
        assert (out / png).read_bytes()[:8] == PNG
        assert f"]({png})" in text
    assert not list(out.glob("*.tmp"))
    client = MlflowClient(store)
    parent = report_mlflow.find_sweep(client, "abl", store)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} == {
        "report/report.md", "report/curves.png", "report/teacher_quality.png",
        "report/kd_gain.png"}


@pytest.mark.slow
@pytest.mark.slow
def test_claims_pair_seeds_and_give_verdicts(store: str, tmp_path: Path) -> None:
    """The sweep's claims (configs/ablation.yaml) on the fabricated runs: only claims whose two
    variants ran appear, paired by seed, with the verdict the differences force."""
    out = tmp_path / "r"
    text = report.write_report(sweep="abl", tracking_uri=store, out=out).read_text()
    claims = table(text, "Claims")
    assert set(claims) == {"teacher_beats_no_teacher", "soft_beats_hard_targets",
                           "teacher10_beats_no_teacher"}
    # dldkdpp vs exploration_only, test SumR by seed: 180-150, 186-160, 183-170
    better, worse, teacher, n, mean, ci, verdict = claims["teacher_beats_no_teacher"]
    assert (better, worse, teacher, n) == ("dldkdpp", "exploration_only", "181.0", "3")
    assert mean == f"{(30 + 26 + 13) / 3:+.1f}" and verdict == "holds"
    # Student t with 2 dof (4.3027): mean 23, sd sqrt(79), half-width 4.3027 * sqrt(79 / 3)
    half = 4.3027 * (79 / 3) ** 0.5
    assert ci == f"[{23 - half:+.1f}, {23 + half:+.1f}]"
    # dldkd has no test split: best val on both sides (180 vs 175), one common seed
    assert claims["soft_beats_hard_targets"][3:] == ["1", "+5.0", "-", "one seed: no interval"]
    # the 10-step teacher loses to no teacher by 10 on both common seeds
    assert claims["teacher10_beats_no_teacher"][3:] == ["2", "-10.0", "[-10.0, -10.0]",
                                                         "reversed"]
    power = table(text, "Power")
    # sd 8.888: n = 79 gives t(78) 1.9908 * 8.888 / sqrt(79) = 1.991; n = 78 gives 2.004
    assert power["teacher_beats_no_teacher"] == ["3", f"{79 ** 0.5:.1f}", f"{half:.1f}", "79"]
    assert power["soft_beats_hard_targets"] == ["1", "-", "-", "-"]
    assert power["teacher10_beats_no_teacher"] == ["2", "0.0", "0.0", "2"]
    assert (out / "kd_gain.png").read_bytes()[:8] == PNG


def test_unknown_sweep_fails_naming_the_sweeps_there(store: str, capsys) -> None:
    assert cli(["report", "--sweep", "nope", "--tracking-uri", store]) == 2
    err = capsys.readouterr().err
    assert "no sweep named 'nope'" in err and "sweeps there: abl, other" in err


@pytest.mark.slow
def test_the_store_comes_from_the_environment_or_an_error(
        store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(report_mlflow.ReportError,
                       match="pass --tracking-uri or set MLFLOW_TRACKING_URI"):
        report.write_report(sweep="abl")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    path = report.write_report(sweep="other", out=tmp_path / "o")
    text = path.read_text()
    assert table(text, "Ablation")["dldkd"][:2] == ["1", "val"]
    assert "No teacher-quality plot" in text
    assert not (tmp_path / "o" / "teacher_quality.png").exists()


@pytest.mark.slow
def test_an_experiment_report_takes_every_trial_run(store: str, tmp_path: Path) -> None:
    path = report.write_report(experiment="dldkd", tracking_uri=store, out=tmp_path / "e")
    ablation = table(path.read_text(), "Ablation")
    assert int(ablation["dldkd"][0]) == 2  # one from each sweep; the parent runs are left out
    with pytest.raises(report_mlflow.ReportError, match="experiments there: Default, dldkd"):
        report.write_report(experiment="nope", tracking_uri=store)


def record(variant: str, **params: str) -> report_mlflow.RunRecord:
    base = {"model.branches": "dual", "loss.kd": "dynamic", "loss.targets": "soft",
            "train.seed": "1", "run.name": variant + params.get("train.seed", "1")}
    return report_mlflow.RunRecord("id", "n", "FINISHED", {**base, **params}, variant=variant)


def test_labels_name_the_variant_or_the_params_that_differ() -> None:
    runs = [record("", **{"optim.lr": "0.001"}), record("", **{"optim.lr": "0.003"}),
            record("", **{"optim.lr": "0.003", "train.seed": "2"})]
    report_stats.assign_labels(runs)
    assert [r.label for r in runs] == ["optim.lr=0.001", "optim.lr=0.003", "optim.lr=0.003"]
    runs = [record("a", **{"teacher.pretrained": "x/t1.pt"}),
            record("a", **{"teacher.pretrained": "x/t2.pt"}), record("b")]
    report_stats.assign_labels(runs)
    assert [r.label for r in runs] == ["a teacher.pretrained=t1.pt",
                                       "a teacher.pretrained=t2.pt", "b"]
    lone = [record("")]
    report_stats.assign_labels(lone)
    assert lone[0].label == "all runs"


def test_teacher_series_group_distilled_runs_apart_from_the_teacher() -> None:
    runs = [record("dldkdpp", **{"teacher.pretrained": "t400"}),
            record("dldkdpp_t10", **{"teacher.pretrained": "t10"}),
            record("dldkd", **{"loss.targets": "hard", "teacher.pretrained": "t400"}),
            record("explo", **{"model.branches": "exploration", "loss.kd": "off",
                               "loss.targets": "hard"})]
    for r, teacher in zip(runs, (180.0, 115.0, 180.0, None)):
        r.test, r.teacher_sumr = {"SumR": 1.0}, teacher
        r.uses_teacher = report_mlflow._uses_teacher(r.params)
    series, base = report_stats.teacher_series(runs)
    assert {k: [r.variant for r in v] for k, v in series.items()} == {
        "dldkdpp": ["dldkdpp", "dldkdpp_t10"]}  # dldkd was seen with one teacher only
    assert [r.variant for r in base] == ["explo"]


def test_mean_std_and_mean_curve_against_a_loop() -> None:
    values = [150.0, 160.0, 170.0]
    assert report_stats.mean_std(values) == (statistics.fmean(values), 10.0)
    mean, std = report_stats.mean_std([3.0])
    assert mean == 3.0 and math.isnan(std)
    a, b = record("v"), record("v")
    a.curve, b.curve = [(10, 1.0), (20, 3.0)], [(10, 2.0)]
    assert report_stats.mean_curve([a, b]) == [(10, 1.5, 2), (20, 3.0, 1)]


def test_runs_selected_on_the_test_split_are_flagged() -> None:
    records = [report_mlflow.RunRecord("a", "run-a", "FINISHED", {}, val_is_test=True),
               report_mlflow.RunRecord("b", "run-b", "FINISHED", {})]
    text = report_render.render("t", [], records, {"curves": Path("curves.png")}, "no teacher")
    assert "**Validation was the test split** for 1 of 2 runs" in text and "run-a" in text
    text = report_render.render("t", [], records[1:], {"curves": Path("curves.png")}, "no teacher")
    assert "Validation was the test split" not in text
