"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class FnaError(Exception):
    """Bad input or a state the user can fix (missing file, malformed architecture, wrong weights)."""
