"""Test settings (set before any heavy import) and session-wide tiny fixtures.

Threads are pinned to one (the suite shares a small machine), tracking is offline and silent, and the
Hugging Face hub is offline: no test reaches the network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
if os.environ.get("WANDB_MODE") != "disabled":  # never online from a test
    os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["RESEARCH_CACHE_DIR"] = __import__("tempfile").mkdtemp(prefix="research-test-cache-")  # no stale cache
_shared = Path(__file__).resolve().parents[2] / "shared" / "data"  # the checkout's sibling, as CI has it
if "RESEARCH_DATA_DIR" not in os.environ and _shared.is_dir():
    os.environ["RESEARCH_DATA_DIR"] = str(_shared)

# Lightning gives its logger a StreamHandler on the sys.stderr of its first import. Imported here, that is the
# session's stream; first imported inside a test, it would be that test's captured stream, closed after it, and
# every later Lightning log line would print a "--- Logging error ---" traceback (test_malformed_inputs run alone).
import lightning.pytorch  # noqa: E402,F401
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import helpers` from any test file

from helpers import make_tiny_beir, make_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT with a tiny WordPiece vocabulary, saved as a Hugging Face directory."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_beir_dir(tmp_path_factory) -> Path:
    """A tiny BEIR folder (6 topics x 6 documents, train and test qrels). Read-only: copy it to change it."""
    return make_tiny_beir(tmp_path_factory.mktemp("tiny_beir") / "tiny")
