# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Locally weighted majority voting, Cython + OpenMP.

Same method as :mod:`cerebseg.kernels.wmv` (its NumPy twin): for atlas k at voxel x,
MSD_k(x) is the mean over the channels atlas k has of the mean over the (2r+1)^3 cube around x
(indices clamped at the volume border, like ``mode='nearest'``) of (I_c - A_kc)^2; the weight is
(MSD_k + eps)^-beta; P_l = sum_k w_k [L_k == l] / sum_k w_k; the fused label is the first l
with the largest P_l.

Where all K atlases vote the same label that label has P = 1 whatever the weights, so the work
is in two calls:

* :func:`wmv_scan` reads the labels once: ``fused`` gets the common label, or -1 where the
  atlases disagree; per x-plane it counts the disagreeing voxels and their y/z bounding box, and
  it checks that every label lies in [0, L).
* :func:`wmv_fuse` computes weights only for the disagreeing voxels, in contiguous chunks of
  x-planes (16 or more, shared out to the threads: small chunks have tight y/z boxes). Per atlas
  it keeps the x-window sum of the squared differences over the chunk's y/z box (grown by r) as
  a plane in double precision, slid along x (two planes of image reads per step); at each
  disagreeing voxel it sums the (2r+1)^2 (y, z) neighbourhood of that plane, or slides that sum
  from the voxel before it in z when that one disagreed too. The probabilities are summed in
  float32, and the label is the best of the voted ones (ties to the smallest label). Output is
  compact: the flat index and the L probabilities of each disagreeing voxel, in C order; no
  (L, X, Y, Z) volume is ever written.

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


cdef inline short _vote(const double *msd, const short *votes, Py_ssize_t n_atlas,
                        Py_ssize_t n_labels, double beta, double eps, double *wk,
                        float *pr) noexcept nogil:
    """One voxel: atlas k's weight (msd[k] + eps)^-beta on its label votes[k]; the label
    probabilities in ``pr`` (n_labels, float32 sums); returns the best voted label (only voted
    labels can win; ties go to the smallest label). ``wk``: n_atlas doubles of scratch."""
    cdef Py_ssize_t k, lab
    cdef double total = 0.0, w, best = -1.0
    cdef short best_lab = 0
    for k in range(n_atlas):
        if beta == 1.0:
            w = 1.0 / (msd[k] + eps)
        else:
            w = pow(msd[k] + eps, -beta)
        wk[k] = w
        total = total + w
    for lab in range(n_labels):
        pr[lab] = 0.0
    for k in range(n_atlas):
        pr[votes[k]] += <float> (wk[k] / total)
    for k in range(n_atlas):
        lab = votes[k]
        if pr[lab] > best or (pr[lab] == best and lab < best_lab):
            best = pr[lab]
            best_lab = <short> lab
    return best_lab


def wmv_scan(const short[:, :, :, ::1] labels, short[:, :, ::1] fused,
             long long[::1] count, int[:, ::1] bbox, unsigned char[::1] bad,
             int n_labels, int num_threads):
    """Agreement pass over ``labels`` (K, X, Y, Z) int16.

    Writes ``fused`` (X, Y, Z): the label all atlases vote, -1 where they disagree; per x-plane
    i, ``count[i]`` disagreeing voxels, ``bbox[i] = (ylo, yhi, zlo, zhi)`` (half-open; empty
    when count is 0) and ``bad[i] = 1`` when a label of the plane lies outside [0, n_labels).
    """
    cdef Py_ssize_t n_atlas = labels.shape[0]
    cdef Py_ssize_t nx = labels.shape[1], ny = labels.shape[2], nz = labels.shape[3]
    cdef Py_ssize_t plane = ny * nz
    cdef Py_ssize_t i, j, l, k, idx, n
    cdef int ylo, yhi, zlo, zhi
    cdef unsigned char oob
    cdef short v, m
    cdef const short *l0
    cdef const short *lk
    cdef short *f
    if n_atlas == 0 or plane == 0:
        return
    with nogil, parallel(num_threads=num_threads):
        for i in prange(nx, schedule='static'):
            l0 = &labels[0, i, 0, 0]
            f = &fused[i, 0, 0]
            oob = 0
            for idx in range(plane):
                v = l0[idx]
                f[idx] = v
                oob = oob | (<unsigned short> v >= n_labels)
            for k in range(1, n_atlas):
                lk = &labels[k, i, 0, 0]
                for idx in range(plane):
                    v = lk[idx]
                    f[idx] = f[idx] | <short> -(v != l0[idx])
                    oob = oob | (<unsigned short> v >= n_labels)
            bad[i] = oob
            n = 0
            ylo = <int> ny
            yhi = 0
            zlo = <int> nz
            zhi = 0
            for j in range(ny):
                m = 0
                for l in range(nz):  # any -1 in the row?
                    m = m | f[j * nz + l]
                if m >= 0:
                    continue
                ylo = <int> j if j < ylo else ylo
                yhi = <int> j + 1
                for l in range(nz):
                    n = n + (f[j * nz + l] < 0)
                l = 0
                while f[j * nz + l] >= 0:
                    l = l + 1
                zlo = <int> l if l < zlo else zlo
                l = nz - 1
                while f[j * nz + l] >= 0:
                    l = l - 1
                zhi = <int> l + 1 if l + 1 > zhi else zhi
            count[i] = n
            bbox[i, 0] = ylo
            bbox[i, 1] = yhi
            bbox[i, 2] = zlo
            bbox[i, 3] = zhi


cdef inline void _union_box(const long long[::1] offset, const int[:, ::1] bbox, Py_ssize_t a,
                            Py_ssize_t b, Py_ssize_t ny, Py_ssize_t nz,
                            Py_ssize_t *box) noexcept nogil:
    """(ylo, yhi, zlo, zhi): the union of the boxes of planes a..b-1 that disagree somewhere."""
    cdef Py_ssize_t i
    box[0] = ny
    box[1] = 0
    box[2] = nz
    box[3] = 0
    for i in range(a, b):
        if offset[i + 1] > offset[i]:
            box[0] = min(box[0], <Py_ssize_t> bbox[i, 0])
            box[1] = max(box[1], <Py_ssize_t> bbox[i, 1])
            box[2] = min(box[2], <Py_ssize_t> bbox[i, 2])
            box[3] = max(box[3], <Py_ssize_t> bbox[i, 3])


cdef Py_ssize_t _plan(const long long[::1] offset, const int[:, ::1] bbox,
                     const unsigned char[:, ::1] available, Py_ssize_t nx, Py_ssize_t ny,
                     Py_ssize_t nz, int radius, int num_threads, Py_ssize_t *plan,
                     double *inv_used):
    """What both fusion kernels share before their parallel loop: ``plan`` gets the first and
    last (half-open) x-planes with voxels to fuse, the number of chunks (small chunks: tighter
    y/z boxes and balanced threads, for one x-window restart each) and the area of the largest
    chunk box grown by the radius (it bounds the per-thread buffers); ``inv_used[k]`` is
    1 / (cube size x channels atlas k has). Returns 0 when there is nothing to fuse."""
    cdef Py_ssize_t first = 0, last = nx, k, c
    cdef Py_ssize_t span[4]
    cdef int n_used
    cdef double inv_cube = 1.0 / ((2 * radius + 1) * (2 * radius + 1) * (2 * radius + 1))
    while first < nx and offset[first + 1] == offset[first]:
        first = first + 1
    while last > first and offset[last] == offset[last - 1]:
        last = last - 1
    if first >= last:
        return 0
    plan[0] = first
    plan[1] = last
    plan[2] = max(1, min(max(16, 4 * <Py_ssize_t> num_threads), (last - first) // 8))
    _union_box(offset, bbox, first, last, ny, nz, span)
    plan[3] = (min(span[1] + radius, ny) - max(span[0] - radius, 0)) * (
        min(span[3] + radius, nz) - max(span[2] - radius, 0))
    for k in range(available.shape[0]):
        n_used = 0
        for c in range(available.shape[1]):
            n_used = n_used + (available[k, c] != 0)
        inv_used[k] = inv_cube / n_used
    return 1


def wmv_fuse(const short[:, :, :, ::1] labels,
             const float[:, :, :, :, ::1] atlas,
             const float[:, :, :, ::1] target,
             const unsigned char[:, ::1] available,
             short[:, :, ::1] fused,
             const long long[::1] offset, const int[:, ::1] bbox,
             long long[::1] index, float[:, ::1] probs,
             int radius, double beta, double eps, int num_threads):
    """Weights, probabilities and labels of the voxels :func:`wmv_scan` marked -1 in ``fused``.

    labels (K, X, Y, Z) int16; atlas (K, C, X, Y, Z) float32; target (C, X, Y, Z) float32;
    available (K, C) uint8; ``offset`` (X + 1,) the running sum of the per-plane counts and
    ``bbox`` the per-plane boxes of :func:`wmv_scan`. The disagreeing voxels of plane i get rows
    offset[i] .. offset[i + 1] of ``index`` (flat C-order voxel index) and ``probs`` (M, L), and
    their label in ``fused``.
    """
    cdef Py_ssize_t n_atlas = labels.shape[0]
    cdef Py_ssize_t nx = labels.shape[1], ny = labels.shape[2], nz = labels.shape[3]
    cdef Py_ssize_t n_chan = target.shape[0]
    cdef Py_ssize_t n_labels = probs.shape[1]
    cdef Py_ssize_t first = 0, last = nx, n_chunks, chunk
    cdef Py_ssize_t ca, cb, ya, yb, za, zb, wy, wz, area, max_area
    cdef Py_ssize_t span[4]
    cdef Py_ssize_t *box
    cdef Py_ssize_t i, ii, j, l, k, c, d, e, idx, row, prev
    cdef double acc, diff_a, diff_b
    cdef const float *t_in
    cdef const float *a_in
    cdef const float *t_out
    cdef const float *a_out
    cdef double *xsum
    cdef double *wk
    cdef double *cube
    cdef double *msdk
    cdef short *votes
    cdef Py_ssize_t *rows
    cdef Py_ssize_t last_l
    cdef double *inv_used
    cdef double *xs
    if n_atlas == 0 or ny * nz == 0:
        return
    inv_used = <double *> malloc(n_atlas * sizeof(double))
    if not _plan(offset, bbox, available, nx, ny, nz, radius, num_threads, span, inv_used):
        free(inv_used)
        return
    first, last, n_chunks, max_area = span[0], span[1], span[2], span[3]
    with nogil, parallel(num_threads=num_threads):
        wk = <double *> malloc(n_atlas * sizeof(double))
        xsum = <double *> malloc(n_atlas * max_area * sizeof(double))
        cube = <double *> malloc(n_atlas * sizeof(double))
        msdk = <double *> malloc(n_atlas * sizeof(double))
        votes = <short *> malloc(n_atlas * sizeof(short))
        rows = <Py_ssize_t *> malloc((2 * radius + 1) * sizeof(Py_ssize_t))
        box = <Py_ssize_t *> malloc(4 * sizeof(Py_ssize_t))
        for chunk in prange(n_chunks, schedule='dynamic', chunksize=1):
            ca = first + chunk * (last - first) // n_chunks
            cb = first + (chunk + 1) * (last - first) // n_chunks
            # y/z box of the chunk's disagreeing voxels, grown by the radius
            _union_box(offset, bbox, ca, cb, ny, nz, box)
            ya = max(box[0] - radius, 0)
            yb = box[1]
            za = box[2]
            zb = box[3]
            yb = min(yb + radius, ny)
            za = max(za - radius, 0)
            zb = min(zb + radius, nz)
            wy = yb - ya
            wz = zb - za
            area = wy * wz
            prev = -2  # the plane xsum holds, or -2: none
            for i in range(ca, cb):
                if offset[i + 1] == offset[i]:
                    continue
                # x-window sums of the squared differences, per atlas, over the chunk's box
                for k in range(n_atlas):
                    xs = xsum + k * area
                    if prev != i - 1:
                        for idx in range(area):
                            xs[idx] = 0.0
                    for c in range(n_chan):
                        if not available[k, c]:
                            continue
                        if prev == i - 1:  # slide: add plane i + r, drop plane i - r - 1
                            ii = _clamp(i + radius, 0, nx)
                            d = _clamp(i - radius - 1, 0, nx)
                            for j in range(wy):
                                t_in = &target[c, ii, ya + j, za]
                                a_in = &atlas[k, c, ii, ya + j, za]
                                t_out = &target[c, d, ya + j, za]
                                a_out = &atlas[k, c, d, ya + j, za]
                                for l in range(wz):
                                    diff_a = t_in[l] - a_in[l]
                                    diff_b = t_out[l] - a_out[l]
                                    xs[j * wz + l] += diff_a * diff_a - diff_b * diff_b
                        else:
                            for e in range(-radius, radius + 1):
                                ii = _clamp(i + e, 0, nx)
                                for j in range(wy):
                                    t_in = &target[c, ii, ya + j, za]
                                    a_in = &atlas[k, c, ii, ya + j, za]
                                    for l in range(wz):
                                        diff_a = t_in[l] - a_in[l]
                                        xs[j * wz + l] += diff_a * diff_a
                prev = i
                # the disagreeing voxels of the plane, in C order
                row = offset[i]
                for j in range(bbox[i, 0], bbox[i, 1]):
                    last_l = -2
                    for l in range(bbox[i, 2], bbox[i, 3]):
                        if fused[i, j, l] >= 0:
                            continue
                        # (2r+1)^2 (y, z) sums of the x-window planes: slid from the voxel before
                        # when it was computed too, else summed afresh
                        if l == last_l + 1:
                            ii = _clamp(l + radius, 0, nz) - za
                            e = _clamp(l - radius - 1, 0, nz) - za
                            for k in range(n_atlas):
                                xs = xsum + k * area
                                acc = 0.0
                                for d in range(2 * radius + 1):
                                    acc = acc + xs[rows[d] + ii] - xs[rows[d] + e]
                                cube[k] = cube[k] + acc
                        else:
                            for d in range(2 * radius + 1):
                                rows[d] = (_clamp(j + d - radius, 0, ny) - ya) * wz
                            for k in range(n_atlas):
                                xs = xsum + k * area
                                acc = 0.0
                                if l >= radius and l + radius < nz:
                                    for d in range(2 * radius + 1):
                                        for e in range(l - radius - za, l + radius + 1 - za):
                                            acc = acc + xs[rows[d] + e]
                                else:
                                    for d in range(2 * radius + 1):
                                        for e in range(-radius, radius + 1):
                                            acc = acc + xs[rows[d] + _clamp(l + e, 0, nz) - za]
                                cube[k] = acc
                        last_l = l
                        for k in range(n_atlas):
                            msdk[k] = cube[k] * inv_used[k]
                            votes[k] = labels[k, i, j, l]
                        fused[i, j, l] = _vote(msdk, votes, n_atlas, n_labels, beta, eps, wk,
                                               &probs[row, 0])
                        index[row] = (i * ny + j) * nz + l
                        row = row + 1
        free(xsum)
        free(wk)
        free(cube)
        free(msdk)
        free(votes)
        free(rows)
        free(box)
    free(inv_used)


cdef inline Py_ssize_t _shift_part(Py_ssize_t s, Py_ssize_t search) noexcept nogil:
    """Shift number s of the (2 search + 1)^3 search cube, as (dx, dy, dz) packed in base
    2 search + 1; shift 0 is (0, 0, 0), the others follow in C order."""
    cdef Py_ssize_t n = 2 * search + 1
    cdef Py_ssize_t centre = (n * n * n) // 2
    if s == 0:
        return centre
    if s <= centre:
        return s - 1
    return s


def wmv_fuse_search(const short[:, :, :, ::1] labels,
                    const float[:, :, :, :, ::1] atlas,
                    const float[:, :, :, ::1] target,
                    const unsigned char[:, ::1] available,
                    const unsigned char[:, :, :, ::1] searchable,
                    short[:, :, ::1] fused,
                    const long long[::1] offset, const int[:, ::1] bbox,
                    long long[::1] index, float[:, ::1] probs,
                    int radius, int search, double beta, double eps, int num_threads):
    """Non-local weighted voting at the voxels marked -1 in ``fused``.

    Atlas k votes, at voxel x, the label of the voxel x + s whose patch best matches the
    subject's patch at x, over the shifts s of the cube |s|_inf <= ``search``:
    MSD_k(x, s) is the mean over the (2r+1)^3 cube around x (indices clamped at the border) and
    over the channels atlas k has of (I_c(p) - A_kc(clamp(p + s)))^2; the smallest wins (the
    unshifted patch on ties, then the first shift in C order), and its label
    L_k(clamp(x + s)) gets the weight (MSD + eps)^-beta; where ``searchable[k, x]`` is 0 atlas
    k keeps its unshifted patch. Same arguments as :func:`wmv_fuse`, plus ``searchable``;
    the marked voxels are those where the K (2 search + 1)^3 candidate labels are not all
    the same (the caller marks them).

    Per chunk of x-planes, atlas and shift, the x-window sums of the squared differences are
    slid along x over the chunk's y/z box (as in :func:`wmv_fuse`); the best MSD and its label
    per marked voxel and atlas are kept until the chunk's voxels are fused.
    """
    cdef Py_ssize_t n_atlas = labels.shape[0]
    cdef Py_ssize_t nx = labels.shape[1], ny = labels.shape[2], nz = labels.shape[3]
    cdef Py_ssize_t n_chan = target.shape[0]
    cdef Py_ssize_t n_labels = probs.shape[1]
    cdef Py_ssize_t side = 2 * search + 1
    cdef Py_ssize_t n_shift = side * side * side
    cdef Py_ssize_t first = 0, last = nx, n_chunks, chunk
    cdef Py_ssize_t ca, cb, ya, yb, za, zb, wy, wz, area, max_area, n_rows, r0
    cdef Py_ssize_t sx, sy, sz, s, code
    cdef Py_ssize_t span[4]
    cdef Py_ssize_t *box
    cdef Py_ssize_t i, ii, iis, ds, j, l, k, c, d, e, idx, row, lab, prev
    cdef double acc, diff_a, diff_b, msd, cube
    cdef const float *t_in
    cdef const float *a_in
    cdef const float *t_out
    cdef const float *a_out
    cdef double *xs
    cdef double *wk
    cdef double *best_msd
    cdef short *best_label
    cdef Py_ssize_t *rows
    cdef Py_ssize_t *zmap
    cdef Py_ssize_t last_l
    cdef double *inv_used
    if n_atlas == 0 or ny * nz == 0:
        return
    inv_used = <double *> malloc(n_atlas * sizeof(double))
    if not _plan(offset, bbox, available, nx, ny, nz, radius, num_threads, span, inv_used):
        free(inv_used)
        return
    first, last, n_chunks, max_area = span[0], span[1], span[2], span[3]
    with nogil, parallel(num_threads=num_threads):
        wk = <double *> malloc(n_atlas * sizeof(double))
        xs = <double *> malloc(max_area * sizeof(double))
        rows = <Py_ssize_t *> malloc((2 * radius + 1) * sizeof(Py_ssize_t))
        zmap = <Py_ssize_t *> malloc(nz * sizeof(Py_ssize_t))
        box = <Py_ssize_t *> malloc(4 * sizeof(Py_ssize_t))
        for chunk in prange(n_chunks, schedule='dynamic', chunksize=1):
            ca = first + chunk * (last - first) // n_chunks
            cb = first + (chunk + 1) * (last - first) // n_chunks
            r0 = offset[ca]
            n_rows = offset[cb] - r0
            if n_rows == 0:
                continue
            best_msd = <double *> malloc(n_rows * n_atlas * sizeof(double))
            best_label = <short *> malloc(n_rows * n_atlas * sizeof(short))
            _union_box(offset, bbox, ca, cb, ny, nz, box)
            ya = max(box[0] - radius, 0)
            yb = min(box[1] + radius, ny)
            za = max(box[2] - radius, 0)
            zb = min(box[3] + radius, nz)
            wy = yb - ya
            wz = zb - za
            area = wy * wz
            for k in range(n_atlas):
                for s in range(n_shift):
                    code = _shift_part(s, search)
                    sx = code // (side * side) - search
                    sy = (code // side) % side - search
                    sz = code % side - search
                    for l in range(za, zb):
                        zmap[l] = _clamp(l + sz, 0, nz)
                    prev = -2
                    for i in range(ca, cb):
                        if offset[i + 1] == offset[i]:
                            continue
                        # x-window sums over the box of (I(p) - A(clamp(p + s)))^2
                        if prev != i - 1:
                            for idx in range(area):
                                xs[idx] = 0.0
                        for c in range(n_chan):
                            if not available[k, c]:
                                continue
                            if prev == i - 1:
                                ii = _clamp(i + radius, 0, nx)
                                d = _clamp(i - radius - 1, 0, nx)
                                iis = _clamp(ii + sx, 0, nx)
                                ds = _clamp(d + sx, 0, nx)
                                for j in range(wy):
                                    t_in = &target[c, ii, ya + j, 0]
                                    a_in = &atlas[k, c, iis, _clamp(ya + j + sy, 0, ny), 0]
                                    t_out = &target[c, d, ya + j, 0]
                                    a_out = &atlas[k, c, ds, _clamp(ya + j + sy, 0, ny), 0]
                                    for l in range(za, zb):
                                        diff_a = t_in[l] - a_in[zmap[l]]
                                        diff_b = t_out[l] - a_out[zmap[l]]
                                        xs[j * wz + l - za] += diff_a * diff_a - diff_b * diff_b
                            else:
                                for e in range(-radius, radius + 1):
                                    ii = _clamp(i + e, 0, nx)
                                    iis = _clamp(ii + sx, 0, nx)
                                    for j in range(wy):
                                        t_in = &target[c, ii, ya + j, 0]
                                        a_in = &atlas[k, c, iis, _clamp(ya + j + sy, 0, ny), 0]
                                        for l in range(za, zb):
                                            diff_a = t_in[l] - a_in[zmap[l]]
                                            xs[j * wz + l - za] += diff_a * diff_a
                        prev = i
                        row = offset[i] - r0
                        for j in range(bbox[i, 0], bbox[i, 1]):
                            last_l = -2
                            cube = 0.0
                            for l in range(bbox[i, 2], bbox[i, 3]):
                                if fused[i, j, l] >= 0:
                                    continue
                                if l == last_l + 1:
                                    ii = _clamp(l + radius, 0, nz) - za
                                    e = _clamp(l - radius - 1, 0, nz) - za
                                    acc = 0.0
                                    for d in range(2 * radius + 1):
                                        acc = acc + xs[rows[d] + ii] - xs[rows[d] + e]
                                    cube = cube + acc
                                else:
                                    for d in range(2 * radius + 1):
                                        rows[d] = (_clamp(j + d - radius, 0, ny) - ya) * wz
                                    acc = 0.0
                                    for d in range(2 * radius + 1):
                                        for e in range(-radius, radius + 1):
                                            acc = acc + xs[rows[d] + _clamp(l + e, 0, nz) - za]
                                    cube = acc
                                last_l = l
                                msd = cube * inv_used[k]
                                lab = labels[k, _clamp(i + sx, 0, nx), _clamp(j + sy, 0, ny),
                                             _clamp(l + sz, 0, nz)]
                                if s == 0 or (searchable[k, i, j, l]
                                              and msd < best_msd[row * n_atlas + k]):
                                    best_msd[row * n_atlas + k] = msd
                                    best_label[row * n_atlas + k] = <short> lab
                                row = row + 1
            # the chunk's voxels: weights of the best patches, probabilities, labels
            for i in range(ca, cb):
                row = offset[i]
                for j in range(bbox[i, 0], bbox[i, 1]):
                    for l in range(bbox[i, 2], bbox[i, 3]):
                        if fused[i, j, l] >= 0:
                            continue
                        idx = (row - r0) * n_atlas
                        fused[i, j, l] = _vote(best_msd + idx, best_label + idx, n_atlas,
                                               n_labels, beta, eps, wk, &probs[row, 0])
                        index[row] = (i * ny + j) * nz + l
                        row = row + 1
            free(best_msd)
            free(best_label)
        free(xs)
        free(wk)
        free(rows)
        free(zmap)
        free(box)
    free(inv_used)
