"""Build-once, cache-forever loading of our C++ torch extensions.

An extension is compiled once per source/torch/Python version into
`<user cache>/moe-lens/ext/<key>/`; later processes import the built library directly. A build
happens in a temporary folder under an exclusive file lock and is renamed into place, so
concurrent first starts neither corrupt nor duplicate each other and a killed build leaves no
stale lock. Each caller has a torch fallback for when a build fails (`load_or_none`).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import platformdirs
import torch

CFLAGS = ("-O3", "-fopenmp")
SHARED_INCLUDE = Path(__file__).resolve().parent / "csrc" / "common"
"""Headers every extension may include (on the include path, in every build key)."""
LDFLAGS = ("-fopenmp",)


def cache_root() -> Path:
    return Path(platformdirs.user_cache_dir("moe-lens")) / "ext"


def build_key(csrc_dir: Path, cflags: tuple[str, ...]) -> str:
    """A digest of every .cpp/.h in csrc_dir and SHARED_INCLUDE, the torch and Python versions
    and the flags."""
    digest = hashlib.sha256()
    for path in sorted(csrc_dir.iterdir()) + sorted(SHARED_INCLUDE.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    tags = (torch.__version__, sys.implementation.cache_tag, platform.machine(), *cflags)
    digest.update("\0".join(tags).encode())
    return digest.hexdigest()[:16]


def _import_library(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_or_build(prefix: str, csrc_dir: Path, sources: tuple[str, ...],
                  extra_cflags: tuple[str, ...] = (),
                  extra_ldflags: tuple[str, ...] = ()) -> ModuleType:
    """Import extension `prefix_<key>` built from the `sources` in csrc_dir, compiling it if
    needed.

    Raises whatever the compiler or the import raises."""
    from torch.utils import cpp_extension  # imported lazily: it is slow and rarely needed

    cflags, ldflags = CFLAGS + extra_cflags, LDFLAGS + extra_ldflags
    key = build_key(csrc_dir, cflags)
    name = f"{prefix}_{key}"
    root = cache_root()
    final = root / key
    library = final / f"{name}{cpp_extension.LIB_EXT}"
    if library.exists():
        return _import_library(name, library)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the OS if this process dies
        if library.exists():  # another process built it while we waited
            return _import_library(name, library)
        for stale in root.glob(f"{key}.*"):  # left by a builder that was killed
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        build_dir = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=root))
        try:
            module = cpp_extension.load(
                name=name, sources=[str(csrc_dir / source) for source in sources],
                extra_cflags=list(cflags), extra_ldflags=list(ldflags),
                extra_include_paths=[str(csrc_dir), str(SHARED_INCLUDE)],
                build_directory=str(build_dir), verbose=False)
            os.rename(build_dir, final)
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)
    return module


def load_or_none(what: str, fallback: str, prefix: str, csrc_dir: Path,
                 sources: tuple[str, ...], extra_cflags: tuple[str, ...] = (),
                 extra_ldflags: tuple[str, ...] = ()) -> ModuleType | None:
    """load_or_build, or None after one RuntimeWarning "<what> unavailable (...); <fallback>"."""
    try:
        return load_or_build(prefix, csrc_dir, sources, extra_cflags, extra_ldflags)
    except Exception as exc:  # any build or import failure means: use the torch fallback
        warnings.warn(f"{what} unavailable ({str(exc)[:400]}); {fallback}", RuntimeWarning,
                      stacklevel=3)
        return None
