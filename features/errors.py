"""The one exception type users see. The CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input or configuration: the message names the file or key and the fix."""
