"""The one exception type for mistakes a user can fix; the CLI prints it as one line and exits 2."""


class UserError(ValueError):
    """Bad input: a file, field or option that is not what was expected."""
