"""The one exception type for bad user input, shared by every layer above `pipelines`.

The command line turns it into a single readable line and a non-zero exit; anything else that
escapes is a bug and keeps its traceback under `--debug`.
"""


class InputError(Exception):
    """Bad input from the user: a missing or corrupt checkpoint, an unknown name, a bad value."""
