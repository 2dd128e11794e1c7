"""Every shard of a split against its manifest, for the tests that write or damage shards."""
from __future__ import annotations

from pathlib import Path

from sharding.writer import load_manifest, sha256_file


def verify_shards(directory) -> dict[str, str]:
    """{shard name: problem}, empty when every shard is present, complete and unaltered."""
    m = load_manifest(directory, kind=None)
    problems = {}
    for s in m.shards:
        path = Path(directory) / s.name
        if not path.exists():
            problems[s.name] = "missing"
        elif path.stat().st_size != s.bytes:
            problems[s.name] = f"size {path.stat().st_size} != {s.bytes} in the manifest (truncated?)"
        elif sha256_file(path) != s.sha256:
            problems[s.name] = "sha256 differs from the manifest (corrupt)"
    return problems
