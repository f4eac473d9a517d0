import os
import sys
from pathlib import Path

# Tests never reach the network: the Hub client stays offline unless a test points it at a stand-in.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread; several threads per process thrash a busy CI machine (10x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread (and do not fight the other test processes)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
