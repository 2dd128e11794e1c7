"""Check that every requirement of the bundle's wheels is met where they are installed.

For each wheel in ``--wheels`` the distribution found on ``sys.path`` (the ``--target`` folder on
``PYTHONPATH`` first, then the image's site-packages) must be that wheel's version, and each of
its requirements (markers evaluated here, no extras) must be installed in a matching version,
except the distributions named by ``--ignore`` (the image's torch, where it cannot be installed).
``--mlflow-smoke DIR`` then logs a run to a SQLite store in DIR, the store the trainer uses.
Imports nothing of torch. Exit 1 with a list of what is unmet.

Run: ``python tools/bundle_check.py --wheels gpu-bundle/wheels [--ignore torch] [--mlflow-smoke DIR]``
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
import sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:   # pip's copy: the check runs before anything else is known to be there
    from pip._vendor.packaging.requirements import Requirement


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(filename: str) -> tuple[str, str]:
    """(normalized name, version) of a wheel file name (PEP 427: name-version-...whl)."""
    name, version = filename.split("-")[:2]
    return normalize(name), version


def unmet(wheels: list[str], ignore: set[str]) -> list[str]:
    """One line per problem: a wheel not installed as itself, or a requirement not met."""
    problems = []
    for filename in wheels:
        name, version = wheel_name_version(filename)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            problems.append(f"{name}: not installed (wheel {filename})")
            continue
        if dist.version != version:
            problems.append(f"{name}: found {dist.version} at {dist.locate_file('')}, "
                            f"not the bundle's {version}")
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            if normalize(req.name) in ignore:
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                problems.append(f"{name} requires {req}: not installed")
                continue
            if not req.specifier.contains(have, prereleases=True):
                problems.append(f"{name} requires {req}: found {have}")
    return problems


def mlflow_smoke(folder: Path) -> str:
    """Log a param and a metric to a fresh SQLite store and read them back."""
    from mlflow import MlflowClient

    folder.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{(folder / 'mlflow.db').resolve()}")
    exp = client.create_experiment("bundle-check",
                                   artifact_location=(folder / "artifacts").resolve().as_uri())
    run = client.create_run(exp)
    client.log_param(run.info.run_id, "check", "ok")
    client.log_metric(run.info.run_id, "x", 1.5, step=1)
    got = client.get_run(run.info.run_id).data
    assert got.params == {"check": "ok"} and got.metrics == {"x": 1.5}, got
    return f"mlflow {md.version('mlflow-skinny')} SQLite store: logged and read back a run"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheels", required=True, help="the bundle's wheel folder")
    p.add_argument("--ignore", default="", help="comma-separated requirements not to check")
    p.add_argument("--mlflow-smoke", default="", help="folder for a throwaway SQLite store")
    a = p.parse_args()
    wheels = sorted(w.name for w in Path(a.wheels).glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {a.wheels}: run `make gpu-bundle` first")
    ignore = {normalize(n) for n in a.ignore.split(",") if n}
    problems = unmet(wheels, ignore)
    for line in problems:
        print(f"UNMET {line}")
    result = {"wheels": len(wheels), "unmet": len(problems), "ignored": sorted(ignore),
              "python": sys.version.split()[0]}
    if a.mlflow_smoke and not problems:
        result["mlflow"] = mlflow_smoke(Path(a.mlflow_smoke))
    print(json.dumps(result))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
