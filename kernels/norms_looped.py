"""The norm kernels for long rows (kernels/norms.py): the row is walked in BLOCK_N chunks
(mean, then the variance around it, then the output), so any hidden size runs without
register spills. Same arguments and semantics as norms.py's one-pass kernels.
"""

import triton
import triton.language as tl


@triton.jit
def _fwd_looped(X, R, W, B, Y, S, Mean, Rstd, M, N, stride_x, stride_r, stride_y, stride_s, eps,
                IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                BLOCK_N: tl.constexpr):
    # torch.compile (inductor) types Python float arguments fp64: the arithmetic stays fp32.
    eps = tl.cast(eps, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    x_row = X + row * stride_x
    if HAS_RES:
        src_row = S + row * stride_s
    else:
        src_row = x_row
    # Pass 1: the residual sum (stored), and the sum (LayerNorm) or sum of squares (RMS).
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs
        m = cols < N
        x = tl.load(x_row + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(R + row * stride_r + cols, mask=m, other=0.0).to(tl.float32)
            s = (x + r).to(S.dtype.element_ty)
            tl.store(src_row + cols, s, mask=m)
            x = s.to(tl.float32)
        if IS_RMS:
            acc += x * x
        else:
            acc += x
    if HAS_RES:
        # Later passes read the sum back: make every thread's stores visible first.
        tl.debug_barrier()
    if IS_RMS:
        mean = 0.0
        var = tl.sum(acc, axis=0) / N
    else:
        mean = tl.sum(acc, axis=0) / N
        tl.store(Mean + row, mean)
        # Pass 2: the variance around the mean (no cancellation, unlike E[x^2] - E[x]^2).
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            m = cols < N
            x = tl.load(src_row + cols, mask=m, other=0.0).to(tl.float32)
            xc = tl.where(m, x - mean, 0.0)
            acc += xc * xc
        var = tl.sum(acc, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Rstd + row, rstd)
    for start in range(0, N, BLOCK_N):
        cols = start + offs
        m = cols < N
        x = tl.load(src_row + cols, mask=m, other=0.0).to(tl.float32)
        y = (x - mean) * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _bwd_looped(X, W, DY, DS, DX, Mean, Rstd, M, N, stride_x, stride_dy, stride_ds, stride_dx, rows_per_program,
                IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_DS: tl.constexpr, BLOCK_N: tl.constexpr):
    # dx only: the weight and bias gradients are _dwdb_looped's. Summed here, they would need
    # a partial row per program in memory, loaded and stored at every row: at hidden 16384 on
    # 528 programs those rows exceed an H100's L2, and the backward moved about 4x the bytes
    # it needs (2.3 ms at 16384 x 16384 in bf16, the first H100 run).
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    row_lo = pid * rows_per_program
    row_hi = tl.minimum(row_lo + rows_per_program, M)
    for row in range(row_lo, row_hi):
        row64 = tl.cast(row, tl.int64)  # the interpreter hands loop variables over as ints
        rstd = tl.load(Rstd + row)
        if IS_RMS:
            mean = 0.0
        else:
            mean = tl.load(Mean + row)
        # Pass 1: the row's two reductions.
        acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            m = cols < N
            x = tl.load(X + row64 * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
            xhat = tl.where(m, (x - mean) * rstd, 0.0)
            if HAS_W:
                dy = dy * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
            acc1 += xhat * dy
            acc2 += dy
        c1 = tl.sum(acc1, axis=0) / N
        c2 = tl.sum(acc2, axis=0) / N
        if IS_RMS:
            c2 = 0.0
        # Pass 2: dx (the row was just read: mostly from L2).
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            m = cols < N
            x = tl.load(X + row64 * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
            xhat = tl.where(m, (x - mean) * rstd, 0.0)
            if HAS_W:
                dy = dy * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
            dx = (dy - xhat * c1 - c2) * rstd
            if HAS_DS:
                dx += tl.load(DS + row64 * stride_ds + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=m)


@triton.jit
def _dwdb_looped(X, DY, Mean, Rstd, DW, DB, M, N, stride_x, stride_dy, rows_per_program,
                 IS_RMS: tl.constexpr, NEED_DW: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """The weight and bias gradients of long rows by column blocks: program (c, g) sums
    dy * xhat (dweight) and dy (dbias) over row group g for the columns of block c, in
    registers, and writes them to row g of the partial sums DW and DB (groups, N)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    group = tl.program_id(1)
    m = cols < N
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_lo = group * rows_per_program
    row_hi = tl.minimum(row_lo + rows_per_program, M)
    for row in range(row_lo, row_hi):
        row64 = tl.cast(row, tl.int64)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        if NEED_DW:
            x = tl.load(X + row64 * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            if IS_RMS:
                xhat = x * tl.load(Rstd + row)
            else:
                xhat = (x - tl.load(Mean + row)) * tl.load(Rstd + row)
            dw += dy * xhat
        if HAS_B:
            db += dy
    if NEED_DW:
        tl.store(DW + group.to(tl.int64) * N + cols, dw, mask=m)
    if HAS_B:
        tl.store(DB + group.to(tl.int64) * N + cols, db, mask=m)
