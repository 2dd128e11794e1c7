"""The retrieval explorer end to end: a run's test evaluation logs it to MLflow, `dldkd eval
--explain` writes the same page, and a real headless Chromium (Debian's `chromium`) loads it
without a console message, paints it, and finds one panel per query shown."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

from tests.conftest import tiny_overrides

CHROMIUM = shutil.which("chromium")
INSTALL = ("chromium not found: the explorer's browser test needs Debian's chromium package "
           "(as root: apt-get install -y chromium; `make test` does it where it can)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]
# Chromium logs every console message and uncaught exception as `...CONSOLE...] "text", source:`.
CONSOLE = re.compile(r'CONSOLE[^\]]*\] "(.*?)", source: ', re.S)
PANELS = 8 + 4   # explain's defaults: the 8 worst queries and a sample of 4 of the best


def browse(url: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url],
                          capture_output=True, text=True, timeout=120, check=True)


def page_in_browser(path, tmp_path) -> tuple[str, list[str], np.ndarray]:
    """The DOM after load, the console messages, and a screenshot as grey levels."""
    from PIL import Image

    loaded = browse(path.as_uri(), tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom")
    shot = tmp_path / "shot.png"
    browse(path.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1200,1600")
    grey = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    return loaded.stdout, CONSOLE.findall(loaded.stderr), grey


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason=INSTALL)
def test_run_and_eval_write_an_explorer_that_loads_in_a_browser(world, tmp_path):
    from mlflow.tracking import MlflowClient

    from launch.cli import main
    from trainer.config import load_config
    from trainer.infra import storage
    from trainer.run import train

    # The harness sees console errors and uncaught exceptions (or the test below proves nothing).
    probe = tmp_path / "probe.html"
    probe.write_text('<p>x</p><script>console.error("probe"); missing()</script>')
    _, messages, _ = page_in_browser(probe, tmp_path)
    assert messages == ["probe", "Uncaught ReferenceError: missing is not defined"]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("configs/tiny.yaml", tiny_overrides(world, tmp_path / "runs", "explorer", **{
        "data.test": str(world / "test"), "tracking.uri": uri, "loss.kd": "off",
        "loss.targets": "hard", "train.epochs": 1}))
    train(cfg, use_deepspeed=False)
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment)
                              .experiment_id])[0]
    logged = client.download_artifacts(run.info.run_id, "best/explorer.html", str(tmp_path))
    best = storage.join(storage.run_location(cfg.run.storage, cfg.run.name), "best")

    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", best, "--split", str(world / "test"),
                 "--out", str(out / "report.json"), "--explain", str(out / "explorer.html")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["queries"] >= PANELS
    assert report["metrics"]["SumR"] == pytest.approx(run.data.metrics["test/SumR"])
    page = (out / "explorer.html").read_text()
    assert page == open(logged).read(), "the run's explorer and `dldkd eval --explain` differ"

    dom, messages, grey = page_in_browser(out / "explorer.html", tmp_path)
    assert messages == [], f"console messages on the explorer page: {messages}"
    assert len(re.findall(r'<article class="query worst"', dom)) == 8
    assert len(re.findall(r'<article class="query (?:worst|best)"', dom)) == PANELS
    assert f"{report['metrics']['R1']:.2f}" in dom and "Recall by length" in dom
    assert grey.std() > 20, f"the screenshot is (nearly) blank: grey std {grey.std():.1f}"
    assert (grey < 200).mean() > 0.02, "the screenshot has almost nothing drawn"
