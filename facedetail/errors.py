"""Exceptions that carry a one-line, user-facing message."""

from __future__ import annotations

from pathlib import Path


class FacedetailError(Exception):
    """Base class: ``str(err)`` is a complete one-line message for the user."""


class SourceFileError(FacedetailError):
    """A source file is missing, corrupt or does not have the expected content.

    The message names the file, what is wrong and how to obtain a good copy.
    """

    def __init__(self, path: Path | str, problem: str, remedy: str) -> None:
        self.path = Path(path)
        self.problem = problem
        self.remedy = remedy
        super().__init__(f"{self.path}: {problem}. {remedy}")

    def __reduce__(self) -> tuple[type, tuple[Path, str, str]]:
        # Raised in a Dask or Ray worker, it is pickled back to the run: keep its three parts.
        return type(self), (self.path, self.problem, self.remedy)


class ChecksumError(SourceFileError):
    """A file's SHA256 does not match the published checksum."""


class InterruptedRunError(RuntimeError):
    """A run stopped part-way for a reason outside the input (a worker process died).

    Work already finished is kept; running again resumes. Not a :class:`FacedetailError`, so
    orchestrators retry it.
    """
