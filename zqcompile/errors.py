"""The one exception type users see from zqcompile."""


class ZQError(Exception):
    """A problem with the user's model, recipe or inputs; the message names the problem and the fix."""
