"""One exception type for every problem a user can fix, each with a one-sentence message."""


class CMoEError(ValueError):
    """A problem with the user's input: the message names it and says how to fix it."""
