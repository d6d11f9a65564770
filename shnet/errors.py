"""Errors that shnet reports to users as one clear message (the CLI prints them without a traceback)."""


class ShnetError(Exception):
    """A refused or failed operation whose message names the thing at fault and what to do."""


class CheckpointMismatchError(ShnetError):
    """A weights file whose parameter names or shapes do not match the model being loaded."""


class CacheError(ShnetError):
    """A cache directory that is missing, locked, written with another config, or damaged."""


class ImageDecodeError(ShnetError):
    """An image file that cannot be decoded into RGB pixels."""
