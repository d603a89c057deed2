"""The one exception type users see (the CLI prints its message on one line and exits 2), and the short form
of a skip reason that summaries count."""


class UserError(Exception):
    """Bad input or configuration: the message names the file or key and the fix."""


def short_reason(reason: str) -> str:
    """'cannot decode: broken data stream (...)' -> 'cannot decode': what summaries group skips by."""
    return reason.split(" (")[0].split(":")[0]
