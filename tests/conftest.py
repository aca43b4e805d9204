import os
from pathlib import Path

import pytest


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A private run store, dataset cache and results folder."""
    monkeypatch.setenv("DETBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("DETBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DETBENCH_RESULTS", str(tmp_path / "results"))
    return tmp_path


MICRO_DATA = {"kind": "synthetic", "image_size": 64, "num_pretrain": 16, "num_train": 8, "num_val": 4, "seed": 0}

# a real COCO 2017 excerpt in the repository (tests/data/coco_excerpt/SOURCE.md);
# DETBENCH_TINY_COCO points the same tests at another COCO-layout folder
TINY_COCO = Path(os.environ.get("DETBENCH_TINY_COCO", Path(__file__).resolve().parent / "data" / "coco_excerpt"))


def connect_slurm_or_skip(base: Path) -> str:
    """Source ``base/env.sh`` (SLURM_CONF) into os.environ and check that a Slurm cluster with
    accounting answers; skip the test with the reason otherwise. Returns ``sinfo``'s line."""
    import shutil
    import subprocess
    if shutil.which("sinfo") is None:
        pytest.skip("Slurm client tools (sinfo) are not installed; run slurm/cluster/start.sh")
    env_sh = base / "env.sh"
    if not env_sh.exists():
        pytest.skip(f"no Slurm cluster: {env_sh} missing; run slurm/cluster/start.sh")
    for line in env_sh.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            k, _, v = line[len("export "):].partition("=")
            os.environ[k.strip()] = v.strip().strip("'\"")
    out = subprocess.run(["sinfo", "-h", "-o", "%T %c"], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip(f"no Slurm cluster answers (sinfo: {out.stderr.strip() or 'no nodes'})")
    if subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True).returncode != 0:
        pytest.skip("Slurm accounting (sacct) does not work; submitit needs it")
    return out.stdout


def wait_for(cond, timeout, what, every=1.0):
    """Poll ``cond`` until it returns something truthy (returned) or fail after ``timeout`` s."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def wait_for_slurm_jobs(job_ids, timeout_s: float = 3600, poll_s: float = 2.0) -> dict[str, dict]:
    """Poll until none of ``job_ids`` is queued or running any more (or only held by a
    dependency that can never be met); returns their final states."""
    import time

    from slurm.submit import ACTIVE_STATES, DEAD_REASONS, slurm_job_states
    ids = [str(j) for j in job_ids]
    deadline = time.monotonic() + timeout_s
    while True:
        states = slurm_job_states(ids)
        if all(i in states and (states[i]["state"] not in ACTIVE_STATES or states[i].get("reason") in DEAD_REASONS)
               for i in ids):
            return states
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs still queued after {timeout_s:.0f} s: "
                               + ", ".join(f"{i} {states.get(i, {}).get('state', '?')}" for i in ids))
        time.sleep(poll_s)


@pytest.fixture
def plain_cpu_kernels():
    """oneDNN builds a kernel per new conv shape (seconds each on a busy 2-core machine); the
    micro models of the method tests see many shapes once, so the plain kernels, one thread
    (micro batches: threading costs more than it brings), are faster. Use with
    ``pytestmark = pytest.mark.usefixtures("plain_cpu_kernels")``."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.backends.mkldnn.flags(enabled=False):
            yield
    finally:
        torch.set_num_threads(threads)
