"""Exception types raised at loramint's module boundaries; the service maps each to one HTTP status."""

from __future__ import annotations


class LoramintError(Exception):
    """Base class of every error loramint raises on purpose."""


class InvalidIdError(LoramintError, ValueError):
    """An expert/adapter id is malformed (bad characters, too long, path traversal)."""


class NotFoundError(LoramintError, KeyError):
    """A named thing (expert, model, task, file) does not exist."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class AlreadyExistsError(LoramintError):
    """An expert with this id is already stored."""


class AdapterError(LoramintError, ValueError):
    """An adapter is unreadable or does not fit its base model (format, shapes, values)."""


class ModelError(LoramintError):
    """A base model cannot be resolved, fetched, converted or loaded."""


class FetchError(LoramintError):
    """A file could not be fetched from PyPI, or did not match its pinned checksum."""


class TaskError(LoramintError, ValueError):
    """A task spec or task file is malformed, or an importer cannot find what was asked for."""


class LibraryError(LoramintError):
    """The expert library on disk is unusable (incompatible embedding model, unreadable metadata)."""


class GeneratorError(LoramintError, ValueError):
    """A generator checkpoint is unusable, or a mint request is malformed (empty description, bad rank)."""
