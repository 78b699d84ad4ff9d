"""The two failures the CLI reports as one line: a mistake the user can fix (exit 2) and a
failure of the machine under a correct command, such as a full disk (exit 1)."""


class UserError(Exception):
    """Bad input (unknown model, bad flag value, data too short, ...). The message says the fix."""


class WriteFailure(Exception):
    """Writing the output failed (disk full, I/O error). The message says what was kept."""


def missing_extra(package: str, extra: str) -> UserError:
    return UserError(f"{package} is not installed; run: pip install 'llmslim[{extra}]'")


def is_write_error(e: BaseException) -> bool:
    """An OS-level write failure, including safetensors' own error type for one."""
    return isinstance(e, OSError) or (type(e).__name__ == "SafetensorError" and "I/O error" in str(e))
