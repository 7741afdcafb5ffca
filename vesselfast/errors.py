"""The one error type that reaches users as a clean one-line message (exit code 2)."""


class UserError(Exception):
    """Bad input from the user: a file, an option or the environment. The CLI prints
    ``vesselfast: error: <message>`` and exits with code 2; the message names what is wrong and what to do."""

    exit_code = 2
