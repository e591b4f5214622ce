import os
import subprocess
import sys

import pytest


@pytest.fixture
def torchrun():
    """``torchrun(args)``: run ``snce <args>`` under ``torchrun --standalone --nproc_per_node 2`` (gloo, one thread
    per rank) and fail the test with the ranks' stderr unless it succeeds."""

    def run(args: list[str]) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        proc = subprocess.run(
            [*cmd, "-m", "snce.cli", *args],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]

    return run
