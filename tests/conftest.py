import os

# The Triton interpreter must be chosen before any kernel module is imported (triton reads it at import).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import SHAPES, make_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name -> (path, transformers MixtralForCausalLM) for every shape in helpers.SHAPES."""
    torch.manual_seed(0)
    out = {}
    for name, kw in SHAPES.items():
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, make_hf_checkpoint(path, **kw))
    return out
