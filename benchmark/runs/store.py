"""The run store. A run's key is a hash of its fully resolved config plus its parent's key;
same key -> reuse, never recompute. A run directory holds config.json, env.json, log.jsonl,
metrics.json (written last, atomically: its presence means done), checkpoints and weights.
Nothing is overwritten: a finished run is never written again."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from benchmark.common.fs import atomic_write_json, unwritable
from benchmark.common.paths import REPO, runs_root
from benchmark.runs.identity import run_key


class StoreError(RuntimeError):
    """The run store cannot be used as asked (unwritable, a run held by another process);
    the message names the path and what to do."""

STAGES = ("pretrain", "finetune", "evaluate")
STATUSES = ("done", "diverged", "failed", "running", "interrupted")   # what RunStore.status says of a run folder
# a run's outcome, kept: running it again computes the same (a diverged run diverges again, at
# the same step); --fresh or `detbench runs --rm` to recompute. A failed run is run again.
RESULTS = ("done", "diverged")


class RunStore:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else runs_root()
        try:   # a read-only store still answers status/metrics/config; writing says what to do
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass

    def run_dir(self, key: str) -> Path:
        return self.root / key

    def status(self, key: str) -> str:
        """done | diverged | failed | running | interrupted | missing. An unfinished run is
        ``running`` while a process holds its lock, ``interrupted`` when none does (killed,
        stopped, or its machine gone): the same command resumes it."""
        d = self.run_dir(key)
        if (d / "metrics.json").exists():
            return "done"
        if (d / "DIVERGED").exists():
            return "diverged"
        if (d / "FAILED").exists():
            return "failed"
        if (d / "config.json").exists():
            return "running" if self._locked(key) else "interrupted"
        return "missing"

    def _locked(self, key: str) -> bool:
        """Whether a live process holds run ``key``'s lock (``lock``): a shared non-blocking
        attempt fails against its exclusive lock; the kernel drops that when its holder dies."""
        try:
            fh = open(self.root / ".locks" / f"{key}.lock")
        except FileNotFoundError:
            return False
        except OSError:
            return True   # unreadable lock: say nothing new
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False

    def metrics(self, key: str) -> dict | None:
        p = self.run_dir(key) / "metrics.json"
        return json.loads(p.read_text()) if p.exists() else None

    def config(self, key: str) -> dict | None:
        p = self.run_dir(key) / "config.json"
        return json.loads(p.read_text()) if p.exists() else None

    def writable(self) -> None:
        """Raise ``StoreError`` naming the folder when runs cannot be written into it."""
        why = unwritable(self.root)
        if why:
            raise StoreError(f"run store {self.root} is not writable ({why}): pass --runs DIR or set "
                             f"DETBENCH_RUNS to a folder you can write")

    @contextlib.contextmanager
    def lock(self, key: str, wait: bool = True):
        """One process computes a run at a time: an exclusive lock on ``<root>/.locks/<key>``,
        which names its holder (pid, host, since). A second identical command waits for it
        (saying who holds it) and then finds the run done; ``wait=False`` raises StoreError."""
        self.writable()
        path = self.root / ".locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                if not wait:
                    raise StoreError(f"run {key} is being computed by {holder} (lock {path})") from None
                print(f"run {key} is being computed by {holder}; waiting for it (lock {path})",
                      file=sys.stderr, flush=True)
                fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            fh.flush()
            try:
                yield
            finally:
                fh.seek(0)
                fh.truncate()
                fcntl.flock(fh, fcntl.LOCK_UN)

    def clean_temporaries(self, key: str) -> list[str]:
        """Remove the temporaries (``.<name>.tmp<pid>``) a killed writer left in a run folder;
        called with the run's lock held, so none of them is being written."""
        d = self.run_dir(key)
        gone = []
        for p in d.glob(".*.tmp*") if d.is_dir() else ():
            if re.fullmatch(r"\..+\.tmp\d+", p.name) and p.is_file():
                p.unlink(missing_ok=True)
                gone.append(p.name)
        return gone

    def invalidate(self, key: str, reason: str) -> None:
        """A done run whose outputs turned out unusable (weights missing or not matching their
        recorded hash) becomes unfinished again: its metrics are kept aside as
        ``metrics.invalid.json`` with the reason, and the same key is computed again."""
        d = self.run_dir(key)
        m = self.metrics(key) or {}
        atomic_write_json(d / "metrics.invalid.json", {**m, "invalidated": reason})
        (d / "metrics.json").unlink(missing_ok=True)

    def begin(self, key: str, config: dict, extra_env: dict | None = None) -> Path:
        self.writable()
        d = self.run_dir(key)
        d.mkdir(parents=True, exist_ok=True)
        p = d / "config.json"
        if p.exists():
            old = json.loads(p.read_text())
            if run_key(old) != key:
                raise RuntimeError(f"{p}: stored config does not hash to its key {key}")
        else:
            atomic_write_json(p, {**config, "key": key})
        for marker in ("FAILED", "DIVERGED"):
            (d / marker).unlink(missing_ok=True)
        atomic_write_json(d / "env.json", {**environment(), **(extra_env or {})})
        return d

    def finish(self, key: str, metrics: dict) -> None:
        d = self.run_dir(key)
        if (d / "metrics.json").exists():
            raise RuntimeError(f"{d}/metrics.json exists: a finished run is never overwritten")
        atomic_write_json(d / "metrics.json", {**metrics, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def fail(self, key: str, error: str, diverged: bool = False) -> None:
        d = self.run_dir(key)
        d.mkdir(parents=True, exist_ok=True)
        (d / ("DIVERGED" if diverged else "FAILED")).write_text(error + "\n")

    def list(self) -> list[dict]:
        out = []
        for d in sorted(self.root.iterdir()) if self.root.exists() else []:
            c = d / "config.json"
            if not c.exists():
                continue
            cfg = json.loads(c.read_text())
            out.append({"key": d.name, "stage": cfg.get("stage"), "label": cfg.get("label", ""),
                        "status": self.status(d.name), "mtime": c.stat().st_mtime})
        return out


def git_info(cwd: Path | None = None) -> dict:
    cwd = cwd or REPO
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        # a copy without git history answers "HEAD" with a non-zero status: that is no sha
        sha = r.stdout.strip() if r.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", r.stdout.strip()) else ""
        # the tool's own outputs (tables, leaderboards, runs under results/) never make a tree dirty
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                             ":(exclude)results"], cwd=cwd, capture_output=True, text=True, timeout=10)
        dirty = bool(st.stdout.strip()) if sha and st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", None
    snap = os.environ.get("DETBENCH_SNAPSHOT_SHA")
    if snap:  # a Slurm job runs from a code snapshot: its manifest knows the dirty flag
        manifest = Path(os.environ.get("DETBENCH_SNAPSHOT", "")) / "SNAPSHOT.json"
        if manifest.is_file():
            try:
                dirty = json.loads(manifest.read_text()).get("dirty", dirty)
            except (OSError, ValueError):
                pass
    return {"sha": snap or sha or "unknown", "dirty": dirty, "snapshot": bool(snap)}


def environment() -> dict:
    import torch
    pkgs = {}
    for p in ("torch", "torchvision", "numpy", "faster-coco-eval", "pycocotools", "submitit",
              "opencv-contrib-python-headless", "detbench"):
        try:
            pkgs[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return {
        "git": git_info(), "python": sys.version.split()[0], "packages": pkgs,
        "hardware": {"host": socket.gethostname(), "platform": platform.platform(),
                     "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(),
                     "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]},
        "slurm": {k: os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
                                             "SLURM_RESTART_COUNT", "SLURM_JOB_PARTITION") if k in os.environ},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
