"""``StopOnSignals`` when no log step comes: ``train.stop_grace_s`` after the signal the process
ends at once (143 after SIGTERM), the MLflow run is marked (``on_abort``) and one line says how
to resume; a second signal does the same without waiting. Each case runs in a process of its own,
since the stop ends it with ``os._exit``."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from trainer.infra.signals import StopOnSignals

    marked = sys.argv[1]
    with StopOnSignals(float(sys.argv[2]), on_abort=lambda: open(marked, "w").write("KILLED")):
        os.kill(os.getpid(), signal.SIGTERM)
        if sys.argv[3] == "twice":
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)   # stuck: no log step ever comes
    print("not stopped")
""")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("how,grace", [("once", 1.0), ("twice", 60.0)])
def test_no_step_within_the_grace_or_a_second_signal_stops_at_once(tmp_path, how, grace):
    marked = tmp_path / "marked"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(marked), str(grace), how],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - start
    assert proc.returncode == 143, proc.stderr
    assert marked.read_text() == "KILLED"
    lines = [line for line in proc.stderr.splitlines() if line.startswith("stopped at once")]
    why = "no log step within 1 s" if how == "once" else "a second signal"
    assert len(lines) == 1 and f"SIGTERM ({why})" in lines[0], proc.stderr
    assert "relaunch the same command to resume" in lines[0]
    assert "not stopped" not in proc.stdout
    assert took < 25, took   # far from the 30 s sleep: the grace (or the second signal) ended it
