"""Starting the workers of these tests and reading what they report."""

import json
import os
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(__file__)


def xla_flags(devices):
    """`XLA_FLAGS` for a worker on `devices` simulated CPU devices. These
    tiny models' steps cost mostly compilation; without LLVM's optimisations
    XLA compiles them in about 2/3 of the time (the sharding worker: 202 s
    against 129 s) and computes the same results."""
    return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(worker, env):
    """`worker` (a file here) in a new Python process with `env` added. Its
    output goes to files, not pipes: a process whose pipe nobody reads yet
    would block writing, and stall its peers in a collective."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, os.path.join(HERE, worker)], env={**os.environ, **env},
        stdout=out, stderr=err, text=True,
    )
    process.files = out, err
    return process


def finish(process, timeout=300):
    """The JSON the worker printed after `RESULT ` (None if nothing)."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    out, err = process.files
    out.seek(0)
    err.seek(0)
    assert process.returncode == 0, err.read()[-4000:]
    results = [line.split(" ", 1)[1] for line in out.read().splitlines() if line.startswith("RESULT ")]
    return json.loads(results[-1]) if results else None
