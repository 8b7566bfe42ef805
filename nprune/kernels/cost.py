"""The cost model: predicted seconds of the dense, compact and CSR ways to run a pruned layer's
products, from which the kernels pick a method per call.

Every estimate is built from four primitives, each a per-element cost plus a per-call cost
(:data:`COST`, measured by ``python -m nprune.kernels.calibrate cost-model``):

* a dense GEMM (``np.matmul``), per multiply-add;
* a CSR product (``csr_matvecs``), per stored value per column of the dense operand;
* the sampled product (SDDMM: gather, multiply, reduce) for the weight gradient, per survivor per
  sample;
* a gather or transposing copy, per element.

*Compact* means a dense GEMM on the live block (the rows and columns of the weight matrix that hold
survivors, everything else dropped); *CSR* means the sparse products on the survivors.

* :func:`conv_modes`: the Conv2D kernel chooses compact or CSR for each of its three products
  (forward, dx, dW) separately.
* :func:`dense_compact_pays`: the Dense kernel runs a whole call compact or CSR; compact must win by
  :data:`COMPACT_MARGIN`, because the model underestimates the gathers around compact's GEMMs.

Whether a layer runs its kernel at all (``auto``) is not decided here but by a measured table
(:mod:`nprune.kernels.thresholds`): the model is good enough to rank methods inside a kernel, not to
call a crossover against the dense code.
"""
from __future__ import annotations

from .thresholds import blas_threads

#: seconds per element and per call of the primitives (see the module docstring)
COST = {
    "gemm_fma": 1.3e-11,      # BLAS sgemm, 2 threads or more, per multiply-add (large matrices)
    "gemm_fma_1thread": 2.3e-11,  # the same at 1 BLAS thread (a --jobs 2 worker on two cores)
    "gemm_call": 9.5e-7,      # fixed cost of one np.matmul call (+ Python around it)
    "spmm_fma": 1.26e-10,     # csr_matvecs, per stored value per column of X
    "spmm_call": 8.0e-6,      # fixed cost of one csr_matvecs call (+ output zeroing)
    "sddmm_fma": 4.0e-10,     # sampled product (gather + multiply + sum), per survivor per sample
    "sddmm_call": 2.0e-5,
    "copy_elem": 9.5e-10,     # gather/transposing copy, per element
    "copy_call": 3.0e-6,
}
#: the Dense kernel runs compact only where the model predicts at most this fraction of CSR's cost
#: (the model leaves out part of the gathering work around compact's GEMMs, so compact must win
#: clearly before it is trusted)
COMPACT_MARGIN = 0.8


def _per_elem(key: str, *factors) -> float:
    """``COST[key]`` times the factors, multiplied left to right."""
    out = COST[key]
    for f in factors:
        out = out * f
    return out


def gemm(*factors) -> float:
    """A dense GEMM of ``prod(factors)`` multiply-adds, at this process's BLAS thread count: the
    GEMM is the only multi-threaded primitive, so at 1 thread it costs about twice as much against
    the others and compact pays at smaller live blocks only."""
    key = "gemm_fma_1thread" if blas_threads() == 1 else "gemm_fma"
    return _per_elem(key, *factors) + COST["gemm_call"]


def spmm(nnz: int, m: int) -> float:
    """A CSR product with ``nnz`` stored values and ``m`` columns."""
    return _per_elem("spmm_fma", nnz, m) + COST["spmm_call"]


def sddmm(nnz: int, m: int) -> float:
    """The sampled product at ``nnz`` survivors over ``m`` samples."""
    return _per_elem("sddmm_fma", nnz, m) + COST["sddmm_call"]


def copy(n: int) -> float:
    """A gather or transposing copy of ``n`` elements."""
    return _per_elem("copy_elem", n) + COST["copy_call"]


def conv_modes(nr: int, nc: int, nnz: int, m: int, train: bool) -> dict:
    """``{"fwd", "dx", "dw"}`` -> ``"compact"`` or ``"sparse"``: the cheaper method of each product
    of a Conv2D step on the live block (nr x nc, ``nnz`` survivors) over ``m`` columns (samples x
    output pixels). Compact pays its GEMM plus gathering the block (forward), or plus picking the
    survivors out of the block's gradient (dW); inference compares the forward only (dx and dW are
    ``compact``, unused)."""
    blk = nr * nc
    if not train:
        f_c = gemm(nr, nc, m) + _per_elem("copy_elem", nr, nc)
        return {"fwd": "compact" if f_c <= spmm(nnz, m) else "sparse", "dx": "compact",
                "dw": "compact"}
    f_s = b_s = spmm(nnz, m)
    return {"fwd": "compact" if gemm(blk, m) + copy(blk) <= f_s else "sparse",
            "dx": "compact" if gemm(blk, m) <= b_s else "sparse",
            "dw": "compact" if gemm(blk, m) + copy(nnz) <= sddmm(nnz, m) else "sparse"}


def dense_compact_pays(shape: tuple, live: tuple, nnz: int, n: int, train: bool, need_dx: bool,
                       fmajor: bool, blk_by_entry: bool) -> bool:
    """The Dense kernel's choice for a call on ``n`` samples: compact (True) or CSR (False).

    ``shape`` = (out, in) of the layer, ``live`` = (nr, nc) the units and inputs with survivors.
    Compact costs its GEMMs on the live block plus gathering the block (unless nothing is dead, when
    the block is W itself), the live inputs, and the assembly of the outputs and of dx; its dW
    writes the block back (or, for a block under a quarter full, the survivors one by one). CSR
    costs its products, the SDDMM, and the transposing copy of an input that is not feature-major."""
    R, C = shape
    nr, nc = live
    all_r, all_c = nr == R, nc == C
    whole = all_c and all_r
    blk = nr * nc
    g = gemm(blk, n)
    comp = (g + (0.0 if whole else copy(blk)) + (0.0 if all_c else copy(n * nc))
            + (0.0 if all_r else copy(n * R)))
    csr = spmm(nnz, n) + (0.0 if fmajor else copy(n * C))
    if train:
        comp += (g + copy(2 * nnz if blk_by_entry and not whole else blk)
                 + (0.0 if all_r else copy(n * nr)))
        csr += sddmm(nnz, n)
        if need_dx:
            comp += g + copy(n * C)
            csr += spmm(nnz, n)
    return bool(nnz) and comp < COMPACT_MARGIN * csr
