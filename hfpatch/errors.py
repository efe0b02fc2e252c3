"""The one base class of errors a user can fix; both CLIs print them as one ``error: ...`` line."""


class UserError(Exception):
    """A problem the user can fix: bad input, a missing or unwritable file, a patch that does not apply.

    The message names what to change; it is shown as is, never with a traceback.
    """
