"""One place builds and validates configs; errors name the key, the value and what is allowed."""
from pathlib import Path
from typing import get_args

import pytest

from trainer.config import (Config, ConfigError, LossConfig, fields_by_key, from_dict, load_config,
                            save_yaml)
from trainer.method.schedules import KD_SHAPES

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
    with pytest.raises(ConfigError, match="unknown config section 'modle'; did you mean 'model'"):
        from_dict({"modle": {}})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="tracking.uri"):
        load_config("configs/tiny.yaml", ["run.storage=s3://bucket/runs"])


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("configs/tvr.yaml", ["optim.lr=1e-4"])
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert Config().flat()["model.hidden"] == 384


def test_files_and_overrides_read_values_alike(tmp_path):
    """YAML 1.2 scalars in both: off/on/yes/no are strings, 1e-4 is a number."""
    path = tmp_path / "c.yaml"
    path.write_text("loss: {kd: off}\ndata: {resident: on}\noptim: {lr: 1e-4}\n")
    from_file = load_config(path)
    from_cli = load_config(None, ["loss.kd=off", "data.resident=on", "optim.lr=1e-4"])
    assert from_file == from_cli
    assert (from_file.loss.kd, from_file.data.resident, from_file.optim.lr) == ("off", "on", 1e-4)
    path.write_text("train: {deterministic: yes}\n")
    for source in ((path, None), (None, ["train.deterministic=yes"])):
        with pytest.raises(ConfigError, match="train.deterministic='yes' must be true or false"):
            load_config(*source)


def test_sections_built_directly_raise_config_errors():
    with pytest.raises(ConfigError, match=r"loss.kd='maybe' is not allowed"):
        LossConfig(kd="maybe")
    with pytest.raises(ConfigError, match=r"model.hidden=True must be an integer"):
        Config(model={"hidden": True})
    with pytest.raises(ConfigError, match=r"optim.lr=0 is out of range; allowed \(0, 1\]"):
        from_dict({"optim": {"lr": 0}})


def test_every_key_is_described_and_rebuilt_as_is(tmp_path):
    """A worker rebuilds the driver's config from its dict; the YAML key names survive
    (teacher.model_config is an alias: pydantic reserves the attribute); an empty section means
    its defaults."""
    keys = fields_by_key()
    assert set(keys) == set(Config().flat())
    assert all(info.description for info in keys.values())
    path = tmp_path / "c.yaml"
    path.write_text("model:\nteacher: {model_config: configs/teacher-tiny.json}\n")
    cfg = load_config(path)
    assert cfg.teacher.arch_config == "configs/teacher-tiny.json" and cfg.model == Config().model
    assert from_dict(cfg.to_dict()) == cfg and "teacher.model_config" in cfg.flat()


def test_schedule_choices_are_the_shapes():
    assert set(get_args(fields_by_key()["loss.kd_schedule"].annotation)) == set(KD_SHAPES)


def test_min_workers_makes_the_run_elastic_up_to_num_workers():
    from launch.jobs.train import workers

    assert workers(from_dict({"dist": {"num_workers": 3, "min_workers": 1}})) == (1, 3)
    assert workers(from_dict({"dist": {"num_workers": 3}})) == 3
    with pytest.raises(ConfigError, match="dist.min_workers=4 must be <= dist.num_workers=3"):
        from_dict({"dist": {"num_workers": 3, "min_workers": 4}})
    with pytest.raises(ConfigError, match="needs dist.zero_stage <= 2"):
        from_dict({"dist": {"num_workers": 3, "min_workers": 1, "zero_stage": 3}})
