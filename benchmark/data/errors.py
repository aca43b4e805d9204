"""Errors raised by the data layer.

Every piece of bad input is reported as a :class:`DataError` that names the file,
the field, and what was expected, so a user can fix the input without reading code.
"""
from __future__ import annotations

import contextlib
import json
import os
from os import PathLike


class DataError(ValueError):
    """Bad input data: ``DataError(path, field, message)``.

    ``str(err)`` reads ``"<path>: field '<field>': <message>"``.
    """

    def __init__(self, path: str | PathLike, field: str | None = None, message: str | None = None):
        if field is None and message is None:
            # one string: how a DataLoader re-raises a worker's error (its traceback as text);
            # the error itself is its last line
            last = [l for l in str(path).splitlines() if l.strip()][-1:] or [""]
            text = last[0].split(f"{type(self).__name__}: ", 1)[-1]
            path, field, message = (text.split(": field '", 1)[0], "?", text)
            self.worker_text = True
        self.path = str(path)
        self.field = str(field)
        self.message = str(message)
        super().__init__(self.path, self.field, self.message)

    def __str__(self) -> str:
        if getattr(self, "worker_text", False):
            return self.message
        return f"{self.path}: field '{self.field}': {self.message}"

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (self.path, self.field, self.message))


class CorruptImage(DataError):
    """An image file exists but cannot be decoded (truncated, corrupt, not an image)."""


class TooManyUnreadable(DataError):
    """More images were unreadable than a run tolerates (``SkipLog.max_fraction``)."""


class SkipLog:
    """The unreadable images a run skipped, counted across every process that reads its data.

    DataLoader workers are separate processes: a count kept in a dataset object stays in the
    worker. So each skip is appended (one short line, ``O_APPEND``) to a file in the run
    folder, which the main process reads to record the count and the file names in the run.
    A dataset finds the log through the environment (``DETBENCH_SKIP_LOG``), which workers
    inherit whether forked or spawned. Above ``max_fraction`` of the dataset's images the
    reader raises :class:`TooManyUnreadable` naming the files (default 1%)."""

    ENV = "DETBENCH_SKIP_LOG"
    ENV_MAX = "DETBENCH_MAX_UNREADABLE"
    DEFAULT_MAX_FRACTION = 0.01

    def __init__(self, path, max_fraction: float | None = None):
        self.path = str(path)
        if max_fraction is None:
            max_fraction = float(os.environ.get(self.ENV_MAX, self.DEFAULT_MAX_FRACTION))
        self.max_fraction = float(max_fraction)

    @classmethod
    def active(cls) -> "SkipLog | None":
        p = os.environ.get(cls.ENV)
        return cls(p) if p else None

    def activate(self):
        """Context manager: datasets opened in this process (and its workers) log here."""

        @contextlib.contextmanager
        def cm():
            old = os.environ.get(self.ENV)
            os.environ[self.ENV] = self.path
            try:
                yield self
            finally:
                if old is None:
                    os.environ.pop(self.ENV, None)
                else:
                    os.environ[self.ENV] = old
        return cm()

    def record(self, path, error: str, n_total: int) -> None:
        """Note one unreadable image of a dataset of ``n_total``; raise above the threshold."""
        line = json.dumps({"file": str(path), "error": str(error), "of": int(n_total)}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        self.check(n_total)

    def _lines(self) -> list[dict]:
        try:
            text = open(self.path, encoding="utf-8").read()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:   # a line torn by a kill
                continue
        return out

    def entries(self) -> dict[str, str]:
        """file -> error, each unreadable file once."""
        out: dict[str, str] = {}
        for e in self._lines():
            out.setdefault(e["file"], e["error"])
        return out

    def check(self, n_total: int | None = None) -> None:
        """Raise :class:`TooManyUnreadable` above the threshold (``n_total``: the dataset's
        size; default: the largest recorded with a skip)."""
        bad = self.entries()
        if n_total is None:
            n_total = max((int(e.get("of", 0)) for e in self._lines()), default=0)
        if n_total > 0 and len(bad) > self.max_fraction * n_total:
            names = ", ".join(sorted(bad)[:5]) + (" ..." if len(bad) > 5 else "")
            raise TooManyUnreadable(
                sorted(bad)[0], "image",
                f"{len(bad)} of {n_total} images are unreadable ({names}), more than "
                f"{self.max_fraction:.0%} of the dataset (set {self.ENV_MAX}=0.05 to tolerate 5%; "
                f"`detbench data check` lists them)")

    def summary(self) -> dict:
        bad = self.entries()
        return {"skipped_images": len(bad), "skipped_files": sorted(bad)}


def note_unreadable(err: "CorruptImage", n_total: int, seen: set, logger) -> None:
    """What a dataset does with an image it cannot read: log it once per file (per process),
    record it in the run's :class:`SkipLog` when there is one (which raises above the
    threshold), and go on with the next image."""
    if err.path in seen:
        return
    seen.add(err.path)
    logger.warning("skipping unreadable image: %s", err)
    log_ = SkipLog.active()
    if log_ is not None:
        log_.record(err.path, err.message, n_total)
