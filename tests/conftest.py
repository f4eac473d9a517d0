import os
import sys
from pathlib import Path

# Tests never reach the network: the Hub client stays offline unless a test points it at a stand-in.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))
