"""The one exception type the CLI turns into a single line on stderr and a non-zero exit."""


class RampError(Exception):
    """A problem with the user's input or environment, described in one line."""


class OtherSettings(RampError):
    """A run directory holds a run made with other settings (the demo, which owns its directories, starts
    such a run over; a user's --out is never removed)."""
