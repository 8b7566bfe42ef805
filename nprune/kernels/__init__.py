"""How pruned Dense and Conv2D layers compute: the masked dense code, sparse kernels, or ``auto``.

A masked dense matmul does the same work at 2% density as at 100%; the sparse kernels skip the
pruned weights. Modules:

* :mod:`~.csr`: the CSR structure of a mask and the sparse products (and the SDDMM for dW);
* :mod:`~.dense`, :mod:`~.conv`: the sparse kernels of Dense and Conv2D layers;
* :mod:`~.cost`: the cost model with which a kernel picks compact or CSR per call;
* :mod:`~.dispatch`: the choice per layer (:func:`apply_kernel`: dense, sparse or auto) and
  :func:`kernel_report`;
* :mod:`~.thresholds`: the table ``auto`` follows (format, checks, files);
* :mod:`nprune.kernels.calibrate` (not imported here): measuring the table on this machine,
  ``python -m nprune.kernels.calibrate --help``.

The training-step speedup at low density also needs the optimiser to skip pruned entries: see the
compact path of :mod:`nprune.optim`.
"""
from .base import SparseKernel
from .conv import ConvKernelSparse, SparseMatrix
from .dense import DenseKernelSparse
from .dispatch import CHOICES, AutoKernel, apply_kernel, auto_kernel, kernel_report, make_kernel
from .thresholds import (SHIPPED_THRESHOLDS, THRESHOLDS_FILE, Thresholds, ThresholdsError,
                         active_thresholds, check_thresholds, load_thresholds,
                         user_thresholds_path)

__all__ = [
    "CHOICES",
    "apply_kernel",
    "kernel_report",
    "make_kernel",
    "auto_kernel",
    "AutoKernel",
    "SparseKernel",
    "DenseKernelSparse",
    "ConvKernelSparse",
    "SparseMatrix",
    "ThresholdsError",
    "Thresholds",
    "active_thresholds",
    "load_thresholds",
    "check_thresholds",
    "user_thresholds_path",
    "THRESHOLDS_FILE",
    "SHIPPED_THRESHOLDS",
]
