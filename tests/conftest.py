import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# Tiny graphs: one intra-op thread is faster than two fighting over the CI machine's two cores.
torch.set_num_threads(1)
