import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny graphs: one intra-op thread is faster than two fighting over the CI machine's two cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """`ispa export` of the tiny preset, shared by the tests that only read it (copy it to edit it)."""
    from ispa_export.cli import main

    d = tmp_path_factory.mktemp("tiny_artifact") / "art"
    assert main(["export", "--model", "tiny", "--kv-reduction", "0.25", "--warmup-chunks", "5", "--out", str(d)]) == 0
    return d
