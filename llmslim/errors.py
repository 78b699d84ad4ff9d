"""One exception type for mistakes a user can fix; the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input (unknown model, bad flag value, data too short, ...). The message says the fix."""


def missing_extra(package: str, extra: str) -> UserError:
    return UserError(f"{package} is not installed; run: pip install 'llmslim[{extra}]'")
