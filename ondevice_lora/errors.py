"""The one exception type for bad user input: the CLI prints its message on one line, exits 2."""


class OdloraError(Exception):
    """A problem with what the user gave us (a path, a file, a flag), stated in one line."""
