"""One place builds and validates configs; errors name the key, the value and what is allowed."""
from pathlib import Path

import pytest

from trainer.config import Config, ConfigError, load_config, save_yaml

PRESETS = sorted(Path("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_load(path):
    load_config(path)


def test_spec7_values_in_presets():
    tvr = load_config("configs/tvr.yaml")
    assert (tvr.model.video_dim, tvr.model.query_dim, tvr.optim.lr, tvr.loss.margin) == (
        3072, 768, 3e-4, 0.1)
    assert (tvr.model.input_drop, tvr.data.batch_videos, tvr.train.epochs, tvr.train.seed) == (
        0.2, 128, 120, 9527)
    anet = load_config("configs/activitynet.yaml")
    assert (anet.optim.lr, anet.loss.margin, anet.model.drop) == (2.5e-4, 0.2, 0.25)
    cha = load_config("configs/charades.yaml")
    assert (cha.optim.lr, cha.loss.margin, cha.model.drop) == (2.4e-4, 0.2, 0.15)


def test_overrides_are_typed():
    cfg = load_config("configs/tiny.yaml", ["model.hidden=64", "optim.betas=[0.9, 0.98]",
                                            "loss.shuffle_teacher=true", "optim.lr=2e-4"])
    assert cfg.model.hidden == 64 and cfg.optim.betas == (0.9, 0.98)
    assert cfg.loss.shuffle_teacher is True and cfg.optim.lr == 2e-4


@pytest.mark.parametrize("override, words", [
    ("model.hidden=abc", ["model.hidden", "'abc'", "integer"]),
    ("model.hiden=3", ["model.hiden", "did you mean 'model.hidden'"]),
    ("loss.kd=maybe", ["loss.kd", "'maybe'", "dynamic"]),
    ("model.drop=1.5", ["model.drop", "1.5", "[0, 1]"]),
    ("model.heads=5", ["model.hidden", "model.heads=5"]),
    ("loss.kd_schedule=cosine", ["loss.kd_schedule", "exp_down"]),
    ("teacher.placement=zero3", ["zero3", "dist.num_workers"]),
    ("train.deterministic=1", ["train.deterministic", "true or false"]),
    ("hidden", ["key.sub=value"]),
])
def test_errors_name_key_value_and_choices(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [override])
    for word in words:
        assert word in str(err.value)


def test_unknown_section_and_remote_storage(monkeypatch):
    with pytest.raises(ConfigError, match="unknown config section 'modle'"):
        from trainer.config import from_dict
        from_dict({"modle": {}})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="tracking.uri"):
        load_config("configs/tiny.yaml", ["run.storage=s3://bucket/runs"])


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("configs/tvr.yaml", ["optim.lr=1e-4"])
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert Config().flat()["model.hidden"] == 384
