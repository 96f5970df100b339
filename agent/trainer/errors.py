"""Errors of the trainer: each says what went wrong in words a device operator can act on."""


class TrainerError(Exception):
    """Base class of the trainer's errors."""


class ModelFileError(TrainerError):
    """A base model file is missing, malformed or corrupted."""


class AdapterError(TrainerError):
    """An adapter does not fit the model (shapes, classes) or holds non-finite values."""


class Cancelled(TrainerError):
    """A fine-tune was cancelled between two batches; nothing was changed."""
