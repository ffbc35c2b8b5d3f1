"""The one exception type the CLI turns into a single clear line on stderr."""


class S2DiTError(Exception):
    """A user-facing error: bad input, a bad model folder, an unwritable path."""
