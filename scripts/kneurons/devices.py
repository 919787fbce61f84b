"""Which device a job runs on: GPU leases on a multi-GPU node.

Snakemake caps the number of concurrent ``gpu=1`` jobs (``--resources gpu=N``) but assigns no
device. A GPU job therefore *leases* one: it takes a non-blocking ``fcntl.flock`` on one lock
file per visible device and holds it for the life of the process (the kernel releases it when
the process ends, even on SIGKILL), then sets ``CUDA_VISIBLE_DEVICES`` to that device before
torch initialises CUDA. Under SLURM the scheduler has already assigned the device, so no lease
is taken there.

Environment:

* ``KNEURONS_GPU_COUNT``: the number of devices to lease from, replacing detection (tests
  simulate a 4-GPU node with it on a machine without GPUs);
* ``KNEURONS_GPU_LOCK_DIR``: the folder of the lock files (default: a folder in the system's
  temporary directory; it must be shared by the jobs of one node).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

_HELD: list = []  # open lock files, held for the life of the process


def visible_devices() -> list[str]:
    """The ids of the GPUs this process may use (without initialising CUDA)."""
    count = os.environ.get("KNEURONS_GPU_COUNT")
    if count is not None:
        return [str(i) for i in range(int(count))]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [device for device in visible.split(",") if device.strip() not in ("", "-1")]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def lock_dir() -> Path:
    folder = Path(os.environ.get("KNEURONS_GPU_LOCK_DIR",
                                 Path(tempfile.gettempdir()) / "kneurons-gpu-locks"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def lease_gpu(devices: list[str], *, wait_s: float = 3600.0, poll_s: float = 0.5) -> str:
    """Lock one of ``devices`` for the life of this process and return its id.

    Tries each device's lock without blocking, in order; when all are held (more concurrent
    jobs than devices, which ``--resources gpu=N`` prevents), waits and tries again.
    """
    folder = lock_dir()
    deadline = time.monotonic() + wait_s
    while True:
        for device in devices:
            handle = open(folder / f"gpu-{device}.lock", "a+")  # noqa: SIM115 (held on purpose)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _HELD.append(handle)
            return device
        if time.monotonic() > deadline:
            raise TimeoutError(f"no free GPU among {devices} after {wait_s:.0f} s (locks in {folder})")
        time.sleep(poll_s)


def pick_device(requested: str | None = None) -> str:
    """The torch device of a job: ``requested`` if given; under SLURM the assigned GPU;
    otherwise a leased GPU (``CUDA_VISIBLE_DEVICES`` narrowed to it); else the CPU.

    Call it before anything initialises CUDA.
    """
    if requested:
        log.info("device: %s (requested)", requested)
        return requested
    import torch

    if os.environ.get("SLURM_JOB_ID"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("device: %s (assigned by SLURM, CUDA_VISIBLE_DEVICES=%s)", device,
                 os.environ.get("CUDA_VISIBLE_DEVICES"))
        return device
    devices = visible_devices()
    if not devices:
        log.info("device: cpu (no GPU visible)")
        return "cpu"
    leased = lease_gpu(devices)
    os.environ["CUDA_VISIBLE_DEVICES"] = leased
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("device: %s (leased GPU %s of %s)", device, leased, devices)
    return device


@contextlib.contextmanager
def tf32_matmuls(enabled: bool = True) -> Iterator[None]:
    """TensorFloat-32 float32 matrix products on CUDA (Ampere and later) in the body, or IEEE
    float32 ones (``enabled=False``, torch's default); the CPU ignores the setting.

    Sets torch's per-backend precision (``torch.backends.cuda.matmul.fp32_precision``) and
    restores it; never the legacy ``allow_tf32`` flags, whose mixing with it raises in torch
    2.9 and later. Which precision to use for attribution: docs/performance.md (GPU).
    """
    import torch

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):  # torch < 2.9: the legacy flag only
        before = matmul.allow_tf32
        matmul.allow_tf32 = enabled
        try:
            yield
        finally:
            matmul.allow_tf32 = before
        return
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = before
