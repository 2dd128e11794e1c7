"""Optuna search (``sweep.search_alg: optuna``) on an analytic objective, no training: the sweep's
own space (``tune_space``) and search algorithm (``search_algorithm``), driven through the
interface Tune's controller uses (``SearchGenerator``, ``next_trial``, ``on_trial_complete``).
Seeded TPE reaches a known optimum in fewer trials than seeded random search, and neither hands
out more trials at once than ``max_concurrent``. (A real Tune sweep with Optuna, resumed and
registering its best trial, is in test_sweep.py.)"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from launch.jobs import sweep_spec
from trainer.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CAP = 150   # trials per search at most
# The optimum: lr 10^-2.5, inh_weight 0.3, seed 2; "found" = within a box around it (1.5% of
# the space: random search needs about 67 trials on average).
BOX = {"optim.lr": 0.4, "model.inh_weight": 0.15}


def objective(config: dict) -> dict:
    decades = math.log10(config["optim.lr"]) + 2.5
    weight = config["model.inh_weight"] - 0.3
    score = -decades ** 2 - 4 * weight ** 2 - 0.5 * (config["train.seed"] != 2)
    found = abs(decades) < BOX["optim.lr"] and abs(weight) < BOX["model.inh_weight"] \
        and config["train.seed"] == 2
    return {"val/SumR": score, "found": found}


def search(alg: str, seed_domain: str, storage: Path, seed: int) -> list[dict]:
    """Results of the trials in the order the algorithm proposed them, up to the first hit."""
    from ray.tune.experiment import Experiment
    from ray.tune.search import SearchGenerator, Searcher

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    spec = sweep_spec.parse_sweep({
        "search_alg": alg, "seed": seed, "num_samples": CAP, "max_concurrent": 1,
        "space": {"optim.lr": {"loguniform": [1e-5, 1e-1]},
                  "model.inh_weight": {"uniform": [0.0, 1.0]},
                  "train.seed": {seed_domain: [0, 1, 2, 3]}}}, cfg)
    space = sweep_spec.tune_space(spec, cfg)
    algorithm = sweep_spec.search_algorithm(spec, spec.max_concurrent)
    if isinstance(algorithm, Searcher):   # as tune.run wraps a searcher
        algorithm = SearchGenerator(algorithm)
    algorithm.set_search_properties(spec.metric, spec.mode, space)
    algorithm.add_configurations([Experiment(alg, lambda config: None, config=space,
                                             num_samples=spec.num_samples,
                                             storage_path=str(storage))])
    results = []
    while len(results) < CAP:
        trial = algorithm.next_trial()
        assert algorithm.next_trial() is None, "a second trial while one runs (max_concurrent=1)"
        result = objective(trial.config)
        algorithm.on_trial_complete(trial.trial_id, result)
        results.append(result)
        if result["found"]:
            break
    return results


def first_hit(results: list[dict]) -> int:
    """Trials run until the first one inside the box (CAP + 1 when none was)."""
    return next((i + 1 for i, m in enumerate(results) if m["found"]), CAP + 1)


def test_grid_keys_become_categoricals_for_optuna() -> None:
    from ray.tune.search.sample import Categorical

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    spec = sweep_spec.parse_sweep({"search_alg": "optuna", "space": {
        "train.seed": {"grid": [1, 2]}, "loss.targets": {"choice": ["soft", "hard"]}},
        "variants": {"a": {"loss.kd": "off"}, "b": {"loss.kd": "dynamic"}}}, cfg)
    space = sweep_spec.tune_space(spec, cfg)
    assert all(isinstance(space[k], Categorical) for k in ("train.seed", "loss.targets",
                                                              "variant"))
    assert space["train.seed"].categories == [1, 2]
    assert space["variant"].categories == ["a", "b"]
    with pytest.raises(Exception, match="claims compare variants"):
        sweep_spec.parse_sweep({"search_alg": "optuna", "variants": spec.variants,
                                "claims": {"c": {"better": "a", "worse": "b"}}}, cfg)


def test_seeded_optuna_finds_the_optimum_before_random_search(tmp_path) -> None:
    """Per seed, random search's first hit varies a lot (seeds 0-7 here: 17 to 142 trials), so
    the comparison is over 8 seeds, each search seeded alike; each is deterministic."""
    optuna, random = [], []
    for seed in range(8):
        found = search("optuna", "grid", tmp_path / f"o{seed}", seed)
        optuna.append(first_hit(found))
        random.append(first_hit(search("random", "choice", tmp_path / f"r{seed}", seed)))
        scores = [m["val/SumR"] for m in found]
        # TPE learns: its proposals after the 10 random start-up trials beat those before
        assert sum(scores[10:]) / len(scores[10:]) > sum(scores[:10]) / 10, (seed, scores)
    assert max(optuna) <= 35, optuna   # Optuna found it within 35 trials at every seed
    assert sum(optuna) < 0.5 * sum(random), (optuna, random)
    assert sorted(optuna)[4] < sorted(random)[4], (optuna, random)   # medians
