"""A per-image cache over a whole dataset, computed in chunks of images that a killed run
resumes: what the proposal cache (selective search) and the mask cache (FH segments) share.

One computation per cache file: a second process waits on the lock and loads the first's
file. Each finished chunk is written atomically as ``<name>-<key>.parts/part-XXXXX.npz``;
the merged file is written by the caller, then the parts are removed.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from benchmark.common.fs import atomic_open, file_lock
from benchmark.data.errors import DataError

log = logging.getLogger(__name__)


def atomic_savez(path: Path, **arrays) -> None:
    with atomic_open(path) as f:
        np.savez_compressed(f, **arrays)


def load_complete(final: Path, load: Callable, discard: bool = False):
    """``load(final)`` when the file is there and readable; a damaged one is reported and (with
    the lock held, ``discard``) removed, so it is recomputed rather than failing every run."""
    if not final.exists():
        return None
    try:
        return load(final)
    except DataError as e:
        log.warning("%s; recomputing it", e)
        if discard:
            final.unlink(missing_ok=True)
        return None


def cached_or_computed(final: Path, load: Callable, compute: Callable[[], object]):
    """The cache at ``final``, computed by ``compute()`` under ``final``'s lock when missing.
    A complete file is read without the lock (a read-only shared cache works)."""
    cached = load_complete(final, load)
    if cached is not None:
        return cached
    lock_path = final.with_suffix(".lock")
    with file_lock(lock_path):
        cached = load_complete(final, load, discard=True)
        if cached is not None:
            return cached
        out = compute()
        lock_path.unlink(missing_ok=True)   # the cache stays one file; waiters find it done
        return out


def part_path(work: Path, chunk: int) -> Path:
    return work / f"part-{chunk:05d}.npz"


def compute_chunks(paths: Sequence[str], work: Path, chunk_size: int, params: dict, *,
                   compute_chunk: Callable[[tuple], dict], init_worker: Callable[[], None],
                   load_part: Callable[[Path, int], dict | None], save_part: Callable[[Path, dict], None],
                   num_workers: int, progress: bool, what: str, on_skip: str) -> list[dict]:
    """Every chunk's part in image order: those a previous (killed) computation finished and
    ``load_part(path, n_images)`` reads back, then ``compute_chunk((chunk, paths, params))`` for
    the others, in this process or over ``num_workers`` processes, each saved as it finishes.
    A chunk's ``errors`` (undecodable images) are logged as "``what``: skipping undecodable image
    (``on_skip``)"."""
    work.mkdir(exist_ok=True)
    chunks = [list(paths[s: s + chunk_size]) for s in range(0, len(paths), chunk_size)]
    parts = {c: part for c in range(len(chunks)) if part_path(work, c).exists()
             and (part := load_part(part_path(work, c), len(chunks[c]))) is not None}
    if parts:
        log.info("%s: resuming, %d of %d chunks already done", what, len(parts), len(chunks))
    jobs = [(c, chunks[c], params) for c in range(len(chunks)) if c not in parts]
    with _progress_bar(progress, total=len(paths), initial=sum(len(chunks[c]) for c in parts), desc=what) as advance:
        for res in _run(jobs, num_workers, compute_chunk, init_worker):
            for msg in res["errors"]:
                log.warning("%s: skipping undecodable image (%s): %s", what, on_skip, msg)
            save_part(part_path(work, res["chunk"]), res)
            parts[res["chunk"]] = res
            advance(len(chunks[res["chunk"]]))
    return [parts[c] for c in range(len(chunks))]


def remove_parts(work: Path, n_chunks: int) -> None:
    """Remove the part files and their folder once the cache file is written."""
    for c in range(n_chunks):
        part_path(work, c).unlink(missing_ok=True)
    for leftover in work.glob("*"):   # stray tmp files of a killed writer
        leftover.unlink(missing_ok=True)
    work.rmdir()


def _run(jobs: list[tuple], num_workers: int, compute_chunk, init_worker):
    """``compute_chunk(job)`` for every job, yielded as each finishes: in this process, or over
    ``num_workers`` spawned processes (a fork from a process whose torch and OpenCV thread
    pools run can deadlock in the child)."""
    if num_workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield compute_chunk(job)
        return
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(min(num_workers, len(jobs)), initializer=init_worker) as pool:
        yield from pool.imap_unordered(compute_chunk, jobs)


@contextlib.contextmanager
def _progress_bar(enabled: bool, *, total: int, initial: int, desc: str):
    """Yields ``advance(n_images)``: a tqdm bar when ``enabled``, else a no-op."""
    if not enabled:
        yield lambda n: None
        return
    from tqdm import tqdm
    bar = tqdm(total=total, initial=initial, unit="img", desc=desc, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()
