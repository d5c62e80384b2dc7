"""Every kernel test runs with GPU kernel outputs poisoned (NaN): a row a kernel forgets to write fails."""

import pytest

from flashmoe.kernels import gpu


@pytest.fixture(autouse=True)
def poison_outputs():
    gpu.set_output_poison(float("nan"))
    yield
    gpu.set_output_poison(None)
