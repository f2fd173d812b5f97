"""Errors a user can fix.

Every message is one line: what is wrong, and how to fix it. The CLI prints the message alone (no
traceback) and exits non-zero; library callers can catch the builtin base class as well.
"""


class LdctClipError(Exception):
    """Base class of the errors whose message is meant for the user as it is."""


class InputError(LdctClipError, ValueError):
    """The input (a path, a volume, an image, a config value) cannot be used."""


class WeightsError(LdctClipError, RuntimeError):
    """Model or encoder weights are missing, unreadable or do not fit the network."""


class OutputError(LdctClipError, FileExistsError):
    """The output location is unsafe or already taken."""
