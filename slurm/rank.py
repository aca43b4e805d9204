"""The entry of each process that ``slurm.local.run_processes`` spawns. It imports nothing
heavy at module level: a Ctrl-C that reaches the process while it still imports torch ends it
quietly (exit 130), as one during training does after the loop has saved; the parent says
"interrupted" once for every run."""
from __future__ import annotations

import errno
import os
import signal
import sys

DISK_FULL_EXIT = errno.ENOSPC   # the exit code of a process that ran out of space


def rank_main(job, store_root, rank, nproc, port, device, runtime) -> None:
    try:
        if nproc > 1:
            os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(port)})
        import torch.distributed as dist

        from benchmark.engine.loop import Diverged
        from benchmark.engine.signals import REQUESTS
        from benchmark.runner import run_job
        REQUESTS.announce = False   # the parent says "stopped" once, for every run
        try:
            run_job(job, store_root, device=device, progress=False, runtime=runtime)
        except Diverged:
            pass   # recorded in the store
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
    except KeyboardInterrupt:   # Ctrl-C: the loop saved at the end of its step; no traceback per process
        sys.exit(130)
    except OSError as e:
        from benchmark.common.fs import no_space
        if no_space(e):   # the parent says it once (slurm.local.run_processes)
            sys.exit(DISK_FULL_EXIT)
        raise
    finally:   # the run is recorded: a Ctrl-C during the process's shutdown has nothing to stop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
