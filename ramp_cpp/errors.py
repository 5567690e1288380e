"""The one exception type the CLI turns into a single line on stderr and a non-zero exit."""


class RampError(Exception):
    """A problem with the user's input or environment, described in one line."""
