"""Exceptions that carry one sentence a user can act on."""


class VpdError(ValueError):
    """Bad input or an unusable artifact, described in one sentence that names the fix.

    The CLI prints the message of this exception and exits with status 2, without a traceback.
    """


class ArtifactFormatError(VpdError):
    """An artifact on disk has a format or version this release cannot read."""


class DamagedArtifactError(VpdError):
    """An artifact's file is missing, cut short or changed since it was written."""
