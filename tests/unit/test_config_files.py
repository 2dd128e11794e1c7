"""Config files: presets derive from the file they name (``base:``), and YAML anchors/aliases are
refused before anything expands, in files and in command-line values alike."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml

from trainer.config import ConfigError, load_config, load_yaml, parse_overrides
from trainer.config_files import merge

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"

# Each derived preset: the file it names as base, and every resolved key in which it differs
# from that base. A change to a preset, or to a base under it, that moves any other preset's
# values fails here; so does a preset that stops deriving.
DERIVED = {
    "demo.yaml": ("tiny.yaml", {
        "data.train": "outputs/demo/world/train", "data.val": "outputs/demo/world/val",
        "data.test": "outputs/demo/world/test", "train.epochs": 3, "run.name": "demo",
        "run.storage": "outputs/demo/runs"}),
    "sweep-demo.yaml": ("demo.yaml", {
        "data.steps_per_epoch": 8, "train.epochs": 4, "train.early_stop": 4,
        "train.log_every": 8, "dist.num_workers": 2, "dist.zero_stage": 2,
        "tracking.system_metrics": False}),
    "ablation.yaml": ("tiny.yaml", {
        "loss.schedule_epochs": 120.0, "data.train": "outputs/ablation/world/train",
        "data.val": "outputs/ablation/world/val", "data.test": "outputs/ablation/world/test",
        "data.true_epochs": True, "teacher.pretrained": "outputs/ablation/teacher/teacher.pt",
        "train.epochs": 4, "train.early_stop": 10, "train.eval_every": 76,
        "dist.max_failures": 2, "tracking.system_metrics": False, "run.name": "ablation",
        "run.storage": "outputs/ablation/runs"}),
    "charades.yaml": ("tvr.yaml", {
        "model.video_dim": 1024, "model.query_dim": 1024, "model.input_drop": 0.15,
        "model.drop": 0.15, "loss.margin": 0.2, "optim.lr": 2.4e-4,
        "data.train": "/shards/charades/train", "data.val": "/shards/charades/val",
        "data.test": "/shards/charades/test", "run.name": "charades-dldkdpp"}),
    "activitynet.yaml": ("tvr.yaml", {
        "model.video_dim": 1024, "model.query_dim": 1024, "model.input_drop": 0.25,
        "model.drop": 0.25, "loss.margin": 0.2, "optim.lr": 2.5e-4,
        "data.train": "/shards/activitynet/train", "data.val": "/shards/activitynet/val",
        "data.test": "/shards/activitynet/test", "run.name": "activitynet-dldkdpp"}),
    "sweep-tvr.yaml": ("tvr.yaml", {"data.true_epochs": False}),
    **{f"{c}-online.yaml": (f"{c}.yaml", {
        "data.train": f"/shards/{c}-frames/train", "teacher.pretrained": "openai",
        "teacher.placement": "replicated", "run.name": f"{c}-dldkdpp-online"})
       for c in ("tvr", "charades", "activitynet")},
}
ROOTS = {"tiny.yaml", "tvr.yaml"}


def test_every_preset_is_a_root_or_in_the_table():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == ROOTS | set(DERIVED)
    for name in ROOTS:
        assert "base" not in yaml.safe_load((CONFIGS / name).read_text())


@pytest.mark.parametrize("name", sorted(DERIVED))
def test_preset_differs_from_its_base_by_the_table(name, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base, expected = DERIVED[name]
    assert yaml.safe_load((CONFIGS / name).read_text())["base"] == base
    child, parent = load_config(CONFIGS / name).flat(), load_config(CONFIGS / base).flat()
    assert {k: v for k, v in child.items() if v != parent[k]} == expected


def test_online_presets_are_a_few_lines():
    for c in ("tvr", "charades", "activitynet"):
        lines = [ln for ln in (CONFIGS / f"{c}-online.yaml").read_text().splitlines()
                 if ln.strip() and not ln.lstrip().startswith("#")]
        assert len(lines) <= 5, lines


def test_small_presets_take_hard_negatives_from_one_place():
    """hard_negative_start_epoch is written once, in tiny.yaml; every small preset inherits it."""
    writers = [p.name for p in CONFIGS.glob("*.yaml")
               if "hard_negative_start_epoch" in (yaml.safe_load(p.read_text()).get("loss") or {})]
    assert writers == ["tiny.yaml"]
    values = {n: load_config(CONFIGS / n).loss.hard_negative_start_epoch
              for n in ("tiny.yaml", "demo.yaml", "sweep-demo.yaml", "ablation.yaml")}
    assert set(values.values()) == {2}, values


def test_sweep_sections_and_bases_resolve_together():
    """launch.jobs.sweep_spec reads the sweep: section from load_yaml's merged tree."""
    tree = load_yaml(CONFIGS / "sweep-demo.yaml")
    assert (tree["sweep"]["name"], tree["model"]["hidden"], tree["run"]["name"]) == (
        "demo-sweep", 128, "demo")
    assert "base" not in tree and "sweep" not in load_yaml(CONFIGS / "demo.yaml")


def test_presets_derive_wherever_they_are_installed(tmp_path):
    """The base is found beside the file (as in site-packages/dldkd_configs), not via the cwd."""
    from dldkd_configs import preset

    copy = tmp_path / "elsewhere" / "dldkd_configs"
    shutil.copytree(CONFIGS, copy)
    assert load_config(copy / "sweep-demo.yaml") == load_config(CONFIGS / "sweep-demo.yaml")
    assert load_config(preset("tvr-online.yaml")) == load_config(CONFIGS / "tvr-online.yaml")


def test_missing_base_and_circles_are_refused_naming_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: nope.yaml\ntrain: {epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: base file 'nope\.yaml' does not exist") as e:
        load_config(tmp_path / "a.yaml")
    assert str(tmp_path / "nope.yaml") in str(e.value)
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "c.yaml").write_text("base: sub/../b.yaml\n")
    with pytest.raises(ConfigError, match="circle") as e:
        load_config(tmp_path / "b.yaml")
    assert "b.yaml -> " in str(e.value) and "c.yaml -> " in str(e.value)
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match="circle"):
        load_yaml(tmp_path / "self.yaml")
    (tmp_path / "list.yaml").write_text("base: [tiny.yaml]\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: base=\['tiny\.yaml'\] must name"):
        load_yaml(tmp_path / "list.yaml")


def test_merge_refines_sections_and_replaces_values():
    base = {"model": {"hidden": 128, "heads": 4}, "optim": {"betas": [0.9, 0.999]}, "run": {}}
    child = {"model": {"hidden": 64}, "optim": {"betas": [0.8, 0.9]}, "run": None}
    assert merge(base, child) == {"model": {"hidden": 64, "heads": 4},
                                  "optim": {"betas": [0.8, 0.9]}, "run": {}}
    assert base["model"]["hidden"] == 128     # the base's tree is not modified


BOMB = ("optim: {betas: [&a [1, 1, 1, 1, 1, 1, 1, 1, 1], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a],"
        " &c [*b, *b, *b, *b, *b, *b, *b, *b, *b], &d [*c, *c, *c, *c, *c, *c, *c, *c, *c],"
        " &e [*d, *d, *d, *d, *d, *d, *d, *d, *d], &f [*e, *e, *e, *e, *e, *e, *e, *e, *e],"
        " &g [*f, *f, *f, *f, *f, *f, *f, *f, *f], &h [*g, *g, *g, *g, *g, *g, *g, *g, *g],"
        " &i [*h, *h, *h, *h, *h, *h, *h, *h, *h], &j [*i, *i, *i, *i, *i, *i, *i, *i, *i]]}\n")


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    """~10^9 leaves once expanded: refused at its first anchor, in milliseconds."""
    path = tmp_path / "bomb.yaml"
    path.write_text("# a config\n" + BOMB)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb\.yaml: line 2, column 17: YAML anchor &a is not "
                                          r"allowed in a config") as e:
        load_config(path)
    assert time.perf_counter() - start < 0.1
    assert "base: FILE" in str(e.value)
    path.write_text("model: {hidden: 64}\nrun: {name: *x}\n")
    with pytest.raises(ConfigError, match=r"line 2, column 13: YAML alias \*x is not allowed"):
        load_yaml(path)


def test_aliases_in_overrides_are_refused():
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"override optim\.betas: value .*YAML anchor &a is not "
                                          r"allowed"):
        parse_overrides(["optim.betas=" + BOMB.split("betas: ", 1)[1].rstrip("}\n")])
    assert time.perf_counter() - start < 0.1
    with pytest.raises(ConfigError, match=r"override run\.name: .*alias \*x.*quote it"):
        load_config(None, ["run.name=*x"])
    assert load_config(None, ["run.name='*x'"]).run.name == "*x"   # quoted: the characters
