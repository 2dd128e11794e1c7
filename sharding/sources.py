"""Where a split's shards are and how their bytes are read: URLs and manifest, tar members.

A split is named by a folder or URL holding ``manifest.json``, the manifest itself, a brace
pattern or a list of shard URLs (:func:`resolve_source`). A shard is read member by member
(:func:`tar_members`); with the manifest's sha256 at hand its bytes are hashed as they are read
and checked when it ends (``sharding.integrity.HashedFile``). :func:`raw_samples` turns shards
into undecoded samples, counting a shard that breaks (or fails its hash) as damage.
"""
from __future__ import annotations

import os
import re
import tarfile
from typing import Iterable, Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from sharding.integrity import DAMAGE, BadDataError, HashedFile, ReadStats, ShardHashError
from sharding.schema import SCHEMA_VERSION, ShardError
from sharding.writer import Manifest, ManifestError, load_manifest

# A member is a flat KEY.TYPE file, as `dldkd shard` writes it: no folder, no '..', a type.
_MEMBER = re.compile(r"[^/\\.][^/\\]*\.[^/\\]+")


def resolve_source(source: str | Iterable[str]) -> tuple[list[str], Manifest | None]:
    """Shard URLs and the manifest (if any) for a directory/manifest location or shard URLs.

    ``source`` may be a directory or URL holding ``manifest.json`` (or the manifest itself), a brace
    pattern (``/data/train-{000000..000009}.tar``), a list of those, local paths, ``file://``,
    ``http(s)://``, ``s3://`` (through fsspec) or ``pipe:`` commands.
    """
    import braceexpand

    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        if not source.endswith(".tar") and not source.startswith("pipe:") and "{" not in source:
            manifest = load_manifest(source)
            return manifest.urls(), manifest
        source = [source]
    urls = [u for s in source for u in braceexpand.braceexpand(os.fspath(s))]
    if not urls:
        raise ValueError(f"no shard URLs in {source!r}")
    return urls, None


def check_manifest(manifest: Manifest, video_dim: int | None = None, query_dim: int | None = None,
                   teacher_dim: int | None = None) -> None:
    """Fail early when the shards were written for another model shape or schema."""
    if manifest.schema_version != SCHEMA_VERSION:
        raise ManifestError(f"shards at {manifest.base} use schema {manifest.schema_version}, "
                            f"this reader reads {SCHEMA_VERSION}")
    for key, want in (("video_dim", video_dim), ("query_dim", query_dim),
                      ("teacher_dim", teacher_dim)):
        have = manifest.dims.get(key)
        if want is not None and have is not None and have != want:
            raise ManifestError(f"shards at {manifest.base} have {key}={have} but the model expects"
                                f" {want}: set model.{key}={have} or point data at other shards")


def shard_hashes(urls: list[str], manifest: Manifest | None) -> dict[str, str]:
    """url -> the manifest's sha256 (none without a manifest: nothing to compare with)."""
    return {u: s.sha256 for u, s in zip(urls, manifest.shards)} if manifest is not None else {}


def local_path(url: str) -> str | None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    return url if parsed.scheme == "" or len(parsed.scheme) == 1 else None   # 1 letter: a drive


def check_member_path(name: str, url: str) -> None:
    """A member named like a path (``../../evil``) or without a type is refused, by its name."""
    if not _MEMBER.fullmatch(name):
        raise ShardError(f"shard {url}: member {name!r} is not a flat KEY.TYPE file name (a "
                         "folder, '..' or no type): this shard was not written by `dldkd shard`; "
                         "rewrite it with `dldkd shard` or remove it from the manifest")


def tar_members(url: str, sha256: str | None = None) -> Iterator[dict]:
    """(fname, data) of every regular member in tar order, tagged with the shard's URL; with
    ``sha256`` the shard's bytes are hashed as read and checked at its end (ShardHashError).

    A local shard is read with random-access ``tarfile`` (about twice as fast as a stream);
    anything else is streamed: ``pipe:`` through webdataset's gopen, URLs through fsspec.
    """
    path = local_path(url)
    if path is not None:
        raw = open(path, "rb")
        f = HashedFile(raw, url, sha256) if sha256 else raw
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    if info.isreg():
                        check_member_path(info.name, url)
                        yield {"fname": info.name, "data": tar.extractfile(info).read(),
                               "__url__": url}
            if sha256:
                f.verify()
        finally:
            f.close()   # a HashedFile's thread ends with it
        return
    if url.startswith("pipe:"):
        stream = wds.gopen(url)
    else:
        import fsspec

        stream = fsspec.open(url, "rb").open()
    f = HashedFile(stream, url, sha256) if sha256 else stream
    try:
        for member in tar_file_iterator(f):
            check_member_path(member["fname"], url)
            member["__url__"] = url
            yield member
        if sha256:
            f.verify()
    finally:
        f.close()


def raw_samples(urls: Iterable[str], stats: ReadStats, expected: dict[str, int],
                give_up_after: int | None, hashes: dict[str, str] | None = None,
                verified: set[str] | None = None) -> Iterator[dict]:
    """Undecoded samples of each shard in turn; a shard that breaks is counted, not fatal. A
    shard whose hash fails at its end counts all its samples as damaged; one whose hash matched
    is added to ``verified`` and read without hashing from then on (its later reads)."""
    dry = 0   # consecutive shards without a single sample
    hashes = {} if hashes is None else hashes
    verified = set() if verified is None else verified
    for url in urls:
        n = 0
        stats.shards += 1
        try:
            sha = None if url in verified else hashes.get(url)
            for sample in group_by_keys(tar_members(url, sha)):
                n += 1
                yield sample
            if sha:
                verified.add(url)
            if n < expected.get(url, 0):
                raise ShardError(f"ends after {n} of the manifest's {expected[url]} samples")
        except DAMAGE as e:   # skip the rest of the shard
            stats.bad_shards += 1
            lost = max(expected.get(url, n), n) if isinstance(e, ShardHashError) else \
                max(expected.get(url, n + 1) - n, 1)
            stats.bad_samples += lost
            stats.note(str(e) if isinstance(e, ShardHashError) else
                       f"shard {url}: {type(e).__name__}: {e} (after {n} samples)")
        dry = 0 if n else dry + 1
        if give_up_after is not None and dry >= give_up_after:
            raise BadDataError(f"{dry} shards in a row gave no sample; last error: "
                               f"{stats.errors[-1] if stats.errors else 'none'}")
