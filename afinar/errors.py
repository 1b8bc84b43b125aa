"""The one exception type for user mistakes.

Anything a user can fix (a bad config key, a malformed JSONL line, a missing file) raises
`AfinarError` with a message naming the place, the value and the fix. The CLI prints it
without a traceback; anything else is a bug and keeps its traceback.
"""


class AfinarError(Exception):
    """A problem the user can fix; `str(err)` is the whole message."""
