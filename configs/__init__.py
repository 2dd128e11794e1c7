"""The shipped presets, installed as the package ``dldkd_configs`` (setup.cfg maps it to this
folder): an installed dldkd finds the files its defaults name (the demo's sweep, the tiny teacher's
open_clip config) without a checkout, while a checkout keeps ``configs/X.yaml`` as documented."""
from importlib.resources import files


def preset(name: str) -> str:
    """The path of a shipped file: YAML loading, open_clip and Ray workers all take paths."""
    path = files(__name__) / name
    if not path.is_file():
        raise FileNotFoundError(f"dldkd ships no config {name!r} (in {files(__name__)})")
    return str(path)
