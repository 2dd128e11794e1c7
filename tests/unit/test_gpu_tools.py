"""The pure parts of the GPU node tools: pins read from constraints, wheel names, the summary's
log parsing (tools/gpu_bundle.py, tools/bundle_check.py, tools/gpu_check_summary.py)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundle_pins_wheel_names_and_check_summary(tmp_path):
    """One test (the suite's budget): pins, wheel names, then the summary of a stopped check."""
    bundle = _load("gpu_bundle")
    text = "# comment\nSQLAlchemy==2.1.9\npydantic_core==2.50.5\nGitPython==3.2.1 ; python_version>'3'\n"
    assert bundle.pins(text, ["sqlalchemy", "pydantic-core", "gitpython"]) == {
        "sqlalchemy": "2.1.9", "pydantic-core": "2.50.5", "gitpython": "3.2.1"}
    with pytest.raises(SystemExit, match="ray"):
        bundle.pins(text, ["ray"])
    pinned = bundle.pins((TOOLS.parent / "constraints.txt").read_text(), bundle.WHEELS)
    assert "ray" not in pinned and "mlflow" not in pinned and pinned["deepspeed"]
    check = _load("bundle_check")
    assert check.wheel_name_version("pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.whl"
                                    ) == ("pydantic-core", "2.50.5")
    summary = _load("gpu_check_summary")
    steps = [{"name": "pytest-gpu", "status": "ok", "seconds": 90.5, "limit_s": 180},
             {"name": "train", "status": "timeout", "seconds": 120.0, "limit_s": 120}]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (tmp_path / "pytest.log").write_text("...\n========== 1 passed in 88.10s ==========\n")
    (tmp_path / "bench-gpu.log").write_text('noise\n{"samples_s": 900.0, "mfu": 0.2}\n')
    (tmp_path / "train.log").write_text(
        "x INFO dldkd: eval step 76: R1=1.0 SumR=120.50 MedR=3\n"
        "x INFO dldkd: step 100/304 | 850.2 samples/s | data 2%\nbest SumR 120.50 at step 76\n")
    s = summary.summarize(tmp_path)
    assert not s["ok"] and s["total_s"] == 210.5 and s["pytest"] == "1 passed in 88.10s"
    assert s["bench_gpu"] == {"samples_s": 900.0, "mfu": 0.2} and s["bench_eval"] is None
    assert s["train"] == {"evals": [{"step": 76, "SumR": 120.5}], "best_sumr": 120.5,
                          "best_step": 76, "last_samples_s": 850.2, "wall_s": 120.0}
