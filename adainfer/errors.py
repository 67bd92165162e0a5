"""Exceptions a user can act on; command-line entry points print them as one line."""


class AdainferError(Exception):
    """Base class: a problem with the user's input, shown without a traceback."""


class BundleError(AdainferError):
    """A bundle is missing, incomplete, corrupt or of an unsupported schema."""


class ExportError(AdainferError):
    """A model cannot be exported, or the exported graphs do not match it."""


class UnsupportedModelError(ExportError):
    """The model's architecture has no adapter."""


class InputError(AdainferError):
    """A prompt, option or data file is unusable (empty, too long, wrong shape)."""


class FetchError(AdainferError):
    """A known model cannot be fetched, or what was fetched does not have the expected sha256."""
