"""The one exception type of the data layer.

Every message starts with where the defect is, so a user can open the file and jump to it:
``FILE:LINE: what is wrong`` for text files, ``FILE: row R: what is wrong`` for feature matrices and
parquet tables, ``FILE: what is wrong`` when no line applies (a missing file, a bad .npy header).
"""
from __future__ import annotations


class DataError(ValueError):
    """Invalid input data; ``str(err)`` names the file and the line (or row) and what is wrong."""

    def __init__(self, file: str, message: str, *, line: int | None = None, row: int | None = None):
        self.file = file
        self.line = line
        self.row = row
        self.problem = message
        if line is not None:
            text = f"{file}:{line}: {message}"
        elif row is not None:
            text = f"{file}: row {row}: {message}"
        else:
            text = f"{file}: {message}"
        super().__init__(text)
