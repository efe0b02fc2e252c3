"""Materialize upstream modeling files from a pinned package.

Source: the installed distribution when its version equals the pin, else the
pinned wheel, downloaded once into a cache directory. Relative imports are
rewritten to absolute ones so the file works outside its package, then the
bytes are checked against the manifest's sha256.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

from hfpatch import files
from hfpatch.errors import UserError

RELATIVE_IMPORT = re.compile(r"^(\s*from\s+)(\.+)([\w.]*)(\s+import\b)", re.MULTILINE)


class UpstreamError(UserError):
    """Upstream source missing, unreachable or not the pinned bytes."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def absolutize_imports(source: str, module_package: str) -> str:
    """``from ...x import y`` inside ``module_package`` → ``from <abs>.x import y``."""

    def replace(match: re.Match) -> str:
        dots, rest = match.group(2), match.group(3)
        parts = module_package.split(".")
        up = len(dots) - 1
        if up >= len(parts):
            raise UpstreamError(f"relative import {dots}{rest} climbs above the package {module_package}")
        base = ".".join(parts[: len(parts) - up])
        absolute = f"{base}.{rest}" if rest else base
        return f"{match.group(1)}{absolute}{match.group(4)}"

    return RELATIVE_IMPORT.sub(replace, source)


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_installed(package: str, relative: str) -> bytes:
    for entry in importlib.metadata.distribution(package).files or []:
        if str(entry) == f"{package}/{relative}":
            return files.read_bytes(Path(entry.locate()))
    raise UpstreamError(f"{package}/{relative} is not part of the installed {package} distribution")


def wheel_path(package: str, version: str, fetch: bool = True) -> Path:
    """The pinned pure-Python wheel, downloaded into the cache on first use."""
    directory = files.cache_dir() / "wheels"
    normalized = package.replace("-", "_")
    found = sorted(directory.glob(f"{normalized}-{version}-*.whl"))
    if found:
        return found[0]
    if not fetch:
        raise UpstreamError(f"no cached wheel for {package}=={version} in {directory}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise files.os_error(exc, directory, "create") from None
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--dest", str(directory), f"{package}=={version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(directory.glob(f"{normalized}-{version}-*.whl"))
    if result.returncode != 0 or not found:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise UpstreamError(
            f"could not fetch the wheel {package}=={version}: {detail[-1] if detail else 'pip download failed'}"
        )
    return found[0]


def _read_wheel(package: str, version: str, relative: str) -> bytes:
    path = wheel_path(package, version)
    try:
        with zipfile.ZipFile(path) as wheel:
            return wheel.read(f"{package}/{relative}")
    except KeyError:
        raise UpstreamError(f"{package}=={version} has no file {package}/{relative}") from None
    except OSError as exc:
        raise files.os_error(exc, path, "read") from None
    except zipfile.BadZipFile:
        raise UpstreamError(f"{path} is not a valid wheel (a broken download?); delete it to fetch it again") from None


def read_upstream(package: str, version: str, relative: str) -> bytes:
    """Raw bytes of ``<package>/<relative>`` at exactly ``version``."""
    if installed_version(package) == version:
        return _read_installed(package, relative)
    return _read_wheel(package, version, relative)


def materialize(package: str, version: str, relative: str) -> bytes:
    """The upstream file with relative imports made absolute: what the zoo keeps."""
    raw = read_upstream(package, version, relative)
    module_package = ".".join([package, *PurePosixPath(relative).parent.parts])
    return absolutize_imports(raw.decode("utf-8"), module_package).encode("utf-8")
