"""Whether a run's validation split is its test split in disguise (model selection on test)."""
from __future__ import annotations

from sharding.writer import ManifestError, load_manifest

CAPTIONS_DIGEST = "captions_sha256"   # manifest notes key: sha256 of the source caption file


def val_is_test(val: str, test: str) -> str | None:
    """A sentence saying that ``val`` holds the captions of ``test``, or None.

    Same location, or both converted from caption files with the same sha256 (the MS-SL
    release's val file may be a copy of its test file). Unreadable manifests say nothing here:
    the reader and ``dldkd validate`` report them.
    """
    if not val or not test:
        return None
    if val.rstrip("/") == test.rstrip("/"):
        return (f"data.val and data.test are the same split ({val}): model selection and early "
                "stopping run on the test split")
    try:
        digests = [load_manifest(s).notes.get(CAPTIONS_DIGEST) for s in (val, test)]
    except (ManifestError, ValueError, OSError):
        return None
    if digests[0] and digests[0] == digests[1]:
        return (f"data.val ({val}) has exactly the captions of data.test ({test}), converted from "
                "identical caption files: model selection and early stopping run on the test "
                "captions")
    return None
