# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Locally weighted majority voting, Cython + OpenMP.

Same method as :mod:`cerebseg.kernels.wmv` (its NumPy twin): for atlas k at voxel x,
MSD_k(x) is the mean over the channels atlas k has of the mean over the (2r+1)^3 cube around x
(indices clamped at the border, like ``mode='nearest'``) of (I_c - A_kc)^2; the weight is
(MSD_k + eps)^-beta; P_l = sum_k w_k [L_k == l] / sum_k w_k; the fused label is the first l
with the largest P_l. Inside the box [x0, x1) x [y0, y1) x [z0, z1) indices are clamped to the
box (the twin filters the same crop with ``mode='nearest'``; the box is grown beyond the votes,
so voxels with a vote see true neighbours). Threads (``num_threads``) take one x-plane at a
time; the cube sums are separable (x, then z, then y), in per-thread plane buffers: no K weight
volumes are ever allocated, only K weight planes per thread.

Typed memoryviews only: the build needs neither NumPy nor torch.
"""
from cython.parallel cimport parallel, prange
from libc.math cimport pow
from libc.stdlib cimport free, malloc


cdef inline Py_ssize_t _clamp(Py_ssize_t v, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    if v < lo:
        return lo
    if v >= hi:
        return hi - 1
    return v


def wmv_kernel(const short[:, :, :, ::1] labels,
               const float[:, :, :, :, ::1] atlas,
               const float[:, :, :, ::1] target,
               const unsigned char[:, ::1] available,
               short[:, :, ::1] fused,
               float[:, :, :, ::1] probs,
               int radius, double beta, double eps, int num_threads,
               Py_ssize_t x0, Py_ssize_t x1, Py_ssize_t y0, Py_ssize_t y1,
               Py_ssize_t z0, Py_ssize_t z1):
    """Fill ``fused`` and ``probs`` inside the box [x0, x1) x [y0, y1) x [z0, z1).

    labels (K, X, Y, Z) int16; atlas (K, C, X, Y, Z) float32; target (C, X, Y, Z) float32;
    available (K, C) uint8; fused (X, Y, Z) int16 and probs (X, Y, Z, L) float32 (labels last:
    one voxel's probabilities are contiguous) are written.
    """
    cdef Py_ssize_t n_atlas = labels.shape[0]
    cdef Py_ssize_t n_chan = target.shape[0]
    cdef Py_ssize_t n_labels = probs.shape[3]
    cdef Py_ssize_t ny = y1 - y0, nz = z1 - z0
    cdef Py_ssize_t plane = ny * nz
    cdef Py_ssize_t i, j, l, k, c, d, idx, lab, best_lab
    cdef double acc, diff, total, best, p, w
    cdef int n_used
    cdef double inv_cube = 1.0 / ((2 * radius + 1) * (2 * radius + 1) * (2 * radius + 1))
    cdef double *col
    cdef double *row
    cdef double *wk
    if n_atlas == 0 or plane == 0 or x1 <= x0:
        return
    with nogil, parallel(num_threads=num_threads):
        col = <double *> malloc(plane * sizeof(double))
        row = <double *> malloc(plane * sizeof(double))
        wk = <double *> malloc(n_atlas * plane * sizeof(double))
        for i in prange(x0, x1, schedule='dynamic'):
            for k in range(n_atlas):
                for idx in range(plane):
                    wk[k * plane + idx] = 0.0
                n_used = 0
                for c in range(n_chan):
                    if not available[k, c]:
                        continue
                    n_used = n_used + 1
                    # sum over x of the squared differences
                    for j in range(ny):
                        for l in range(nz):
                            acc = 0.0
                            for d in range(-radius, radius + 1):
                                diff = (target[c, _clamp(i + d, x0, x1), y0 + j, z0 + l]
                                        - atlas[k, c, _clamp(i + d, x0, x1), y0 + j, z0 + l])
                                acc = acc + diff * diff
                            col[j * nz + l] = acc
                    # then over z
                    for j in range(ny):
                        for l in range(nz):
                            acc = 0.0
                            for d in range(-radius, radius + 1):
                                acc = acc + col[j * nz + _clamp(l + d, 0, nz)]
                            row[j * nz + l] = acc
                    # then over y: the cube mean, added to this atlas's MSD plane
                    for j in range(ny):
                        for l in range(nz):
                            acc = 0.0
                            for d in range(-radius, radius + 1):
                                acc = acc + row[_clamp(j + d, 0, ny) * nz + l]
                            wk[k * plane + j * nz + l] += acc * inv_cube
                for idx in range(plane):
                    if beta == 1.0:
                        wk[k * plane + idx] = 1.0 / (wk[k * plane + idx] / n_used + eps)
                    else:
                        wk[k * plane + idx] = pow(wk[k * plane + idx] / n_used + eps, -beta)
            # votes
            for j in range(ny):
                for l in range(nz):
                    for lab in range(n_labels):
                        probs[i, y0 + j, z0 + l, lab] = 0.0
                    total = 0.0
                    for k in range(n_atlas):
                        w = wk[k * plane + j * nz + l]
                        total = total + w
                        probs[i, y0 + j, z0 + l, labels[k, i, y0 + j, z0 + l]] += <float> w
                    best = -1.0
                    best_lab = 0
                    for lab in range(n_labels):
                        p = probs[i, y0 + j, z0 + l, lab] / total
                        probs[i, y0 + j, z0 + l, lab] = <float> p
                        if probs[i, y0 + j, z0 + l, lab] > best:
                            best = probs[i, y0 + j, z0 + l, lab]
                            best_lab = lab
                    fused[i, y0 + j, z0 + l] = <short> best_lab
        free(col)
        free(row)
        free(wk)
