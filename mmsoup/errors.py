"""The one exception type a user can cause; the CLI prints its message as one sentence."""


class MMSoupError(Exception):
    """A problem with the user's input (file, argument, data): the message names it and the fix."""
