"""User-facing errors: the CLI prints these as one clear line, without a traceback."""


class UserError(ValueError):
    """Bad input from the user (a suite file, an override, a name): says what is wrong and what is valid."""
