"""Errors raised by the data layer.

Every piece of bad input is reported as a :class:`DataError` that names the file,
the field, and what was expected, so a user can fix the input without reading code.
"""
from __future__ import annotations

from os import PathLike


class DataError(ValueError):
    """Bad input data: ``DataError(path, field, message)``.

    ``str(err)`` reads ``"<path>: field '<field>': <message>"``.
    """

    def __init__(self, path: str | PathLike, field: str, message: str):
        self.path = str(path)
        self.field = str(field)
        self.message = str(message)
        super().__init__(self.path, self.field, self.message)

    def __str__(self) -> str:
        return f"{self.path}: field '{self.field}': {self.message}"

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (self.path, self.field, self.message))


class CorruptImage(DataError):
    """An image file exists but cannot be decoded (truncated, corrupt, not an image)."""
