import os

import pytest
import torch

# Two xdist workers share two cores: one thread each keeps the suite from oversubscribing them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
