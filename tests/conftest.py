import os

import pytest
import torch

# Tests are deterministic and small; two threads match CI's machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The tiny official-format FP8 checkpoint (dsv3.tiny), written once per session. Read-only: copy it before
    changing anything."""
    from dsv3.tiny import write_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    write_tiny_checkpoint(path)
    return path
