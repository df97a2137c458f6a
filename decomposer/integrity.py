"""The sha256 of an artifact's files: recorded in its JSON when it is written, checked before it is read.

A file cut short by an interrupted copy, or changed since it was written, then gets one sentence naming the
file and the fix instead of a deserialisation traceback.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import Tensor

from decomposer.errors import DamagedArtifactError

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record_sha256(folder: str | Path, names: Iterable[str]) -> dict[str, str]:
    """File name → sha256 for the files `names` of `folder`, to store in the artifact's JSON."""
    return {name: file_sha256(Path(folder) / name) for name in names}


def check_sha256(folder: str | Path, recorded: Mapping[str, str], *, fix: str) -> None:
    """Compare each file of `folder` named in `recorded` with its recorded sha256.

    Args:
        folder: The artifact's folder.
        recorded: File name → sha256 as written by `record_sha256`.
        fix: What the user should do, ending the sentence (e.g. "run `vpd harvest` again").

    Raises:
        DamagedArtifactError: A recorded file is missing or its bytes differ from those written.
    """
    for name, expected in recorded.items():
        path = Path(folder) / name
        if not path.is_file():
            raise DamagedArtifactError(f"{path} is missing, though it was written with this artifact; {fix}.")
        found = file_sha256(path)
        if found != expected:
            raise DamagedArtifactError(
                f"{path} is damaged: its sha256 is {found[:12]}…, not the {expected[:12]}… recorded when it was "
                f"written (cut short or changed since); {fix}."
            )


def load_safetensors(path: str | Path, *, fix: str) -> dict[str, Tensor]:
    """`safetensors.torch.load_file`, with an unreadable file reported in one sentence.

    Raises:
        DamagedArtifactError: The file is cut short or is not safetensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as err:
        raise DamagedArtifactError(f"{path} cannot be read as safetensors ({err}); {fix}.") from None
