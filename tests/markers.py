"""Test markers shared across test modules (conftest.py is not importable: benchmarks/ has one too)."""

import pytest

from kvlink import kernels

requires_gpu = pytest.mark.skipif(not kernels.cuda_available(), reason="needs a CUDA GPU and CuPy")
