"""Crop + resample + normalise + patchify: an original uint8 image to Qwen2.5-VL's `pixel_values`.

What is fused: cutting a box out of the original, PIL-style antialiased bicubic resampling to the
smart_resize'd size (a = -0.5, support widened by the scale when shrinking, sample centres at
(i + 0.5) * scale, taps kept inside the crop), x/255, CLIP mean/std, the 2-frame temporal repeat and the
2x2 merge-window patch order. Output rows: (gh/2, gw/2, 2, 2) windows; columns (channel, time, y, x).

Like PIL, both paths clip to 0..255 between the horizontal and the vertical pass.
`crop_resample_ref` is the torch reference (the CPU path and the kernel's test oracle); it converts only the
crop, not the whole original, to float. `crop_resample_triton` is PIL's separable filter as two launches
for all boxes: a horizontal pass reads the uint8 original and writes an fp32 intermediate (3, crop rows,
output width) per box; a vertical pass (a program per output patch of 14x14 pixels) reads it along
contiguous rows, normalises, and writes 2 x 3 x 196 values straight into the patch tensor. The horizontal
pass comes two ways until a GPU has timed both (`HPASS`): "dot", a program per 64 crop rows x 64 output
columns, a matrix product on tensor cores of the rows' pixels, read along the row, with the tile's banded
weights; "gather", a program per 16 x 64, each output pixel's taps read one at a time. Each program loops
over its own box's taps (about 4 * scale + 1 per axis, or the input columns its tile spans), so a small
crop does not pay for a large one beside it, and computes the taps' weights itself (a few flops per tap):
the host sends one record of a few integers per box (`plan`), in one small copy, and each program finds its
box among them.
Limits: the intermediate holds 12 bytes per (crop row x output column): 60 MB for an 8K original at 1,024
tokens.
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

PATCH = 14  # ViT patch side
MERGE = 2  # 2x2 patches merge into one language-model token
TEMPORAL = 2  # a still image is repeated to 2 frames
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def patchify(x):
    """x: (3, H, W) normalised float, H and W multiples of 28 -> (gh*gw, 1176) in Qwen's order."""
    c, h, w = x.shape
    gh, gw = h // PATCH, w // PATCH
    x = x.unsqueeze(0).expand(TEMPORAL, c, h, w)  # (T, C, H, W)
    x = x.reshape(TEMPORAL, c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    # -> (gh/2, gw/2, 2, 2, C, T, 14, 14): windows of 2x2 patches, each patch (channel, time, y, x)
    x = x.permute(2, 5, 3, 6, 1, 0, 4, 7)
    return x.reshape(gh * gw, c * TEMPORAL * PATCH * PATCH)


def crop_resample_ref(image, boxes, out_hw, out_dtype=torch.float32):
    """image: uint8 (H, W, 3); boxes: (K, 4) integer-valued x1, y1, x2, y2 (x2, y2 exclusive);
    out_hw: K (h, w) pairs (multiples of 28). Returns (sum_k h_k*w_k/196, 1176), computed in fp32."""
    mean = torch.tensor(MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(STD, device=image.device).view(3, 1, 1)
    out = []
    for (x1, y1, x2, y2), (oh, ow) in zip(boxes.tolist(), out_hw):
        crop = image[int(y1):int(y2), int(x1):int(x2)].permute(2, 0, 1).unsqueeze(0).float()  # (1, 3, h, w)
        # torch's antialiased bicubic is PIL's filter (a = -0.5, widened support, renormalised edge taps). PIL
        # runs it as two passes, horizontal then vertical, each stored as uint8: clip after each (PIL also
        # rounds; leaving that out keeps the kernel and this reference within 1e-4 of each other).
        crop = _aa_bicubic(crop, (crop.shape[2], ow)).clamp_(0.0, 255.0)
        crop = _aa_bicubic(crop, (oh, ow))[0]
        crop = crop.clamp_(0.0, 255.0)
        out.append(patchify((crop / 255.0 - mean) / std))
    return torch.cat(out).to(out_dtype)


def _aa_bicubic(x, size):
    """torch's antialiased bicubic resize of x (1, 3, h, w). On CUDA its kernel keeps every output pixel's
    weights in shared memory and refuses a downscale of more than about 90x on an axis (a whole 8K image at a
    few tokens): that resize runs on the CPU instead."""
    try:
        return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    except RuntimeError as e:
        if not x.is_cuda or "shared memory" not in str(e):
            raise
        return F.interpolate(x.cpu(), size=size, mode="bicubic", antialias=True, align_corners=False).to(x.device)


# ---------------------------------------------------------------- Triton

# Per box, one int64 record of FIELDS values, the only table the kernels read: the crop (left column, top row,
# width, height), its output size, its tap count per axis (a loop bound), and where its intermediate planes,
# its first h-pass program and its first patch (= its first output row) start
X1, Y1, W_IN, H_IN, OH, OW, KX, KY, MID_AT, TILE_AT, PATCH_AT, FIELDS = (tl.constexpr(i) for i in range(12))
P, M = tl.constexpr(PATCH), tl.constexpr(MERGE)  # as the kernels see them
# The horizontal pass, two ways, until a GPU has timed both (bench.py crop) [choice: "dot", by the count of
# memory transactions; the loser goes]: "dot", a tile of crop rows x output columns as a matrix product of the
# rows' pixels, loaded along the row, with the tile's banded weight matrix, on tensor cores; "gather", each
# output pixel's taps loaded one by one (a warp's 32 lanes then read bytes about `scale` pixels apart: for an
# 8K image at 1,024 tokens, ~5 cache lines per load). Each: its kernel and its tile (crop rows, output columns).
HPASS = "dot"
VPASS_BLOCK = 16  # the vertical pass's tile side: a power of 2 >= the patch side 14


@triton.jit
def _find_box(rec_ptr, first_field: tl.constexpr, p, K, MAX_K: tl.constexpr):
    """The record of the box program p works on: the last whose first program is <= p (one vector load)."""
    ks = tl.arange(0, MAX_K)
    first = tl.load(rec_ptr + ks * FIELDS + first_field, mask=ks < K, other=0)
    k = tl.sum(((first <= p) & (ks < K)).to(tl.int32), axis=0) - 1
    return rec_ptr + k.to(tl.int64) * FIELDS


@triton.jit
def _span(o, n_in, n_out, ok):
    """PIL's antialiased bicubic taps for output indices o (n_in -> n_out): the first input tap, its offset
    from the sample centre in filter units (the support widens by the scale when shrinking), the filter unit,
    the number of taps inside the input (0 where not ok). Tap j's weight, unnormalised, is Keys' cubic
    (a = -0.5) of |start + j * step|; PIL computes the same in float64 (here: float32, within 1e-6)."""
    scale = n_in.to(tl.float32) / n_out.to(tl.float32)
    fs = tl.maximum(scale, 1.0)
    center = (o.to(tl.float32) + 0.5) * scale
    lo = tl.maximum((center - 2.0 * fs + 0.5).to(tl.int32), 0)  # float -> int truncates, as PIL's int()
    hi = tl.minimum((center + 2.0 * fs + 0.5).to(tl.int32), n_in)
    return lo, (lo.to(tl.float32) - center + 0.5) / fs, 1.0 / fs, tl.where(ok, hi - lo, 0)


@triton.jit
def _store_mid(mid_ptr, box, ys, xs, y_ok, x_ok, h_in, ow, r, g, b, total):
    """An h-pass tile's sums, into the box's intermediate planes. PIL normalises the weights to sum to 1, and
    stores each pass as uint8: clip to 0..255 (its rounding is left out, as in the reference)."""
    norm = (1.0 / tl.where(total == 0.0, 1.0, total))[None, :]
    plane = h_in * ow
    at = mid_ptr + tl.load(box + MID_AT) + ys[:, None] * ow + xs[None, :]
    ok = y_ok[:, None] & x_ok[None, :]
    tl.store(at, tl.clamp(r * norm, 0.0, 255.0), mask=ok)
    tl.store(at + plane, tl.clamp(g * norm, 0.0, 255.0), mask=ok)
    tl.store(at + 2 * plane, tl.clamp(b * norm, 0.0, 255.0), mask=ok)


@triton.jit
def _hpass_kernel(
    img_ptr,  # uint8 original (H, W, 3), contiguous
    mid_ptr,  # out: fp32 intermediate, per box (3, H_IN, OW) planes from its MID_AT
    rec_ptr,  # int64 (K, FIELDS) box records
    K, W,  # the number of boxes; the original's width
    MAX_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # horizontal pass over BLOCK_R crop rows x BLOCK_C output columns, weights computed here:
    # mid[c, y, x] = clip(sum_j w(x, j) img[y1 + y, x1 + j, c] / sum_j w(x, j)); the box's tap count bounds the loop
    p = tl.program_id(0)
    box = _find_box(rec_ptr, TILE_AT, p, K, MAX_K)
    w_in, h_in, ow, kx = tl.load(box + W_IN), tl.load(box + H_IN), tl.load(box + OW), tl.load(box + KX).to(tl.int32)
    local = p - tl.load(box + TILE_AT)
    tiles_x = tl.cdiv(ow, BLOCK_C)
    ys = (local // tiles_x) * BLOCK_R + tl.arange(0, BLOCK_R)
    xs = (local % tiles_x) * BLOCK_C + tl.arange(0, BLOCK_C)
    y_ok, x_ok = ys < h_in, xs < ow
    lo, start, step, n = _span(xs, w_in, ow, x_ok)
    rows = (tl.load(box + Y1) + ys).to(tl.int64)[:, None] * W  # int64: an 8K image has 33M pixels x 3
    x1 = tl.load(box + X1)
    r = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    g = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    b = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    total = tl.zeros([BLOCK_C], tl.float32)
    for j in range(0, kx):
        u = tl.abs(start + j * step)  # Keys' cubic, a = -0.5 (written out: a nested call is slow to interpret)
        wx = tl.where(u < 1.0, (1.5 * u - 2.5) * u * u + 1.0, ((u - 5.0) * u + 8.0) * u * -0.5 + 2.0)
        wx = tl.where((j < n) & (u < 2.0), wx, 0.0)
        total += wx
        keep = y_ok[:, None] & (wx != 0.0)[None, :]  # never read past the crop
        px = img_ptr + (rows + (x1 + lo + j)[None, :]) * 3
        r += wx[None, :] * tl.load(px, mask=keep, other=0).to(tl.float32)
        g += wx[None, :] * tl.load(px + 1, mask=keep, other=0).to(tl.float32)
        b += wx[None, :] * tl.load(px + 2, mask=keep, other=0).to(tl.float32)
    _store_mid(mid_ptr, box, ys, xs, y_ok, x_ok, h_in, ow, r, g, b, total)


@triton.jit
def _hpass_dot_kernel(
    img_ptr,  # uint8 original (H, W, 3), contiguous
    mid_ptr,  # out: fp32 intermediate, per box (3, H_IN, OW) planes from its MID_AT
    rec_ptr,  # int64 (K, FIELDS) box records
    K, W,  # the number of boxes; the original's width
    MAX_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # the same intermediate as _hpass_kernel, for BLOCK_R crop rows x BLOCK_C output columns, as a matrix product:
    # mid[c, y, :] = clip(img[y1 + y, x1 + i, c] @ w[i, :] / sum_i w[i, :]) over the input columns i the tile's
    # taps span, BLOCK_K at a time; w[i, x] = Keys' cubic at (i + 0.5 - centre(x)) / filter unit, 0 outside its
    # support (which is exactly PIL's taps of x). Pixels (0..255) are exact in fp16; each weight is split into two
    # fp16 parts, so two fp16 products (fp32 accumulate) give ~22 bits of the weight, as fp32 arithmetic would.
    p = tl.program_id(0)
    box = _find_box(rec_ptr, TILE_AT, p, K, MAX_K)
    w_in, h_in, ow = tl.load(box + W_IN), tl.load(box + H_IN), tl.load(box + OW)
    local = p - tl.load(box + TILE_AT)
    tiles_x = tl.cdiv(ow, BLOCK_C)
    ys = (local // tiles_x) * BLOCK_R + tl.arange(0, BLOCK_R)
    c0 = (local % tiles_x) * BLOCK_C
    xs = c0 + tl.arange(0, BLOCK_C)
    y_ok, x_ok = ys < h_in, xs < ow
    scale = w_in.to(tl.float32) / ow.to(tl.float32)
    fs = tl.maximum(scale, 1.0)
    inv = 1.0 / fs
    center = (xs.to(tl.float32) + 0.5) * scale
    # the input columns of the tile's taps: the first column's first to the last (valid) column's last, as _span
    c1 = (tl.minimum(c0 + BLOCK_C, ow) - 1).to(tl.float32)
    lo = tl.maximum(((c0.to(tl.float32) + 0.5) * scale - 2.0 * fs + 0.5).to(tl.int32), 0)
    hi = tl.minimum(((c1 + 0.5) * scale + 2.0 * fs + 0.5).to(tl.int32), w_in.to(tl.int32))
    rows = (tl.load(box + Y1) + ys).to(tl.int64)[:, None] * W  # int64: an 8K image has 33M pixels x 3
    x1 = tl.load(box + X1)
    r = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    g = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    b = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    total = tl.zeros([BLOCK_C], tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hi
        u = tl.abs((ks.to(tl.float32) + 0.5)[:, None] - center[None, :]) * inv
        w = tl.where(u < 1.0, (1.5 * u - 2.5) * u * u + 1.0, ((u - 5.0) * u + 8.0) * u * -0.5 + 2.0)
        w = tl.where((u < 2.0) & k_ok[:, None] & x_ok[None, :], w, 0.0)
        total += tl.sum(w, axis=0)
        w_hi = w.to(tl.float16)
        w_lo = (w - w_hi.to(tl.float32)).to(tl.float16)
        px = img_ptr + (rows + (x1 + ks)[None, :]) * 3  # along the row: the warp's lanes read neighbouring bytes
        keep = y_ok[:, None] & k_ok[None, :]
        a = tl.load(px, mask=keep, other=0).to(tl.float16)
        r = tl.dot(a, w_lo, tl.dot(a, w_hi, r))
        a = tl.load(px + 1, mask=keep, other=0).to(tl.float16)
        g = tl.dot(a, w_lo, tl.dot(a, w_hi, g))
        a = tl.load(px + 2, mask=keep, other=0).to(tl.float16)
        b = tl.dot(a, w_lo, tl.dot(a, w_hi, b))
    _store_mid(mid_ptr, box, ys, xs, y_ok, x_ok, h_in, ow, r, g, b, total)


# h-pass name -> its kernel and its tile as launched (crop rows, output columns; the dot's input columns per
# product): the dot's 64 rows are a Hopper warp group's MMA rows
HPASSES = {"dot": (_hpass_dot_kernel, dict(BLOCK_R=64, BLOCK_C=64, BLOCK_K=64)),
           "gather": (_hpass_kernel, dict(BLOCK_R=16, BLOCK_C=64))}


@triton.jit
def _vpass_kernel(
    mid_ptr,  # fp32 intermediate from the h-pass (whichever of its kernels ran)
    out_ptr,  # out: (num_patches, 1176) float32 or bfloat16
    rec_ptr,  # int64 (K, FIELDS) box records
    K,  # the number of boxes
    m0, m1, m2, s0, s1, s2,  # CLIP mean and 1/std per channel
    MAX_K: tl.constexpr, BLOCK: tl.constexpr,
):
    # vertical pass for output patch p (14x14 pixels, also its row in out): out[c, y, x] =
    # clip(sum_t w(y, t) mid[c, y0 + t, x] / sum_t w(y, t)), then x/255, CLIP normalisation, Qwen's patch layout
    p = tl.program_id(0)
    box = _find_box(rec_ptr, PATCH_AT, p, K, MAX_K)
    h_in, oh, ow, ky = tl.load(box + H_IN), tl.load(box + OH), tl.load(box + OW), tl.load(box + KY).to(tl.int32)
    # the patch's place in Qwen's order: 2x2 merge windows, row-major, each window's patches row-major
    local = p - tl.load(box + PATCH_AT)
    window, inner = local // (M * M), local % (M * M)
    per_row = ow // (P * M)
    i = tl.arange(0, BLOCK)
    ok = i < P
    ys = ((window // per_row) * M + inner // M) * P + i
    xs = ((window % per_row) * M + inner % M) * P + i
    lo, start, step, n = _span(ys, h_in, oh, ok)
    plane = h_in * ow
    base = mid_ptr + tl.load(box + MID_AT)
    r = tl.zeros([BLOCK, BLOCK], tl.float32)
    g = tl.zeros([BLOCK, BLOCK], tl.float32)
    b = tl.zeros([BLOCK, BLOCK], tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    for t in range(0, ky):
        u = tl.abs(start + t * step)  # as in the h-pass
        wy = tl.where(u < 1.0, (1.5 * u - 2.5) * u * u + 1.0, ((u - 5.0) * u + 8.0) * u * -0.5 + 2.0)
        wy = tl.where((t < n) & (u < 2.0), wy, 0.0)
        total += wy
        keep = (wy != 0.0)[:, None] & ok[None, :]
        at = base + (lo + t)[:, None] * ow + xs[None, :]  # contiguous along x
        r += wy[:, None] * tl.load(at, mask=keep, other=0.0)
        g += wy[:, None] * tl.load(at + plane, mask=keep, other=0.0)
        b += wy[:, None] * tl.load(at + 2 * plane, mask=keep, other=0.0)
    norm = (1.0 / tl.where(total == 0.0, 1.0, total))[:, None]
    r = (tl.clamp(r * norm, 0.0, 255.0) / 255.0 - m0) * s0
    g = (tl.clamp(g * norm, 0.0, 255.0) / 255.0 - m1) * s1
    b = (tl.clamp(b * norm, 0.0, 255.0) / 255.0 - m2) * s2
    # columns (channel, time, y, x): each channel's 14x14 block, written for both frames
    offs = p.to(tl.int64) * 1176 + i[:, None] * P + i[None, :]
    mask = ok[:, None] & ok[None, :]
    dt = out_ptr.dtype.element_ty
    for f in range(0, 2):
        tl.store(out_ptr + offs + f * 196, r.to(dt), mask=mask)
        tl.store(out_ptr + offs + 392 + f * 196, g.to(dt), mask=mask)
        tl.store(out_ptr + offs + 784 + f * 196, b.to(dt), mask=mask)


def num_taps(n_in, n_out):
    """Input taps per output index along an axis of n_in -> n_out: the bicubic support (2, widened by the
    scale when shrinking) on both sides, plus one."""
    return 2 * math.ceil(2.0 * max(n_in / n_out, 1.0)) + 1


def plan(boxes, out_hw, hpass=None):
    """The box records (K, FIELDS), and the sizes of the h-pass grid, of the output (patches) and of the
    intermediate: all the host computes. It is a few integers per box (the taps and their weights are computed
    in the kernels), so it does not grow with the crops, and it goes to the device in one small copy."""
    tile = HPASSES[hpass or HPASS][1]
    records, tiles, patches, mid = [], 0, 0, 0
    for (x1, y1, x2, y2), (oh, ow) in zip(boxes.tolist(), out_hw):
        x1, y1, w_in, h_in = int(x1), int(y1), int(x2) - int(x1), int(y2) - int(y1)
        records.append([x1, y1, w_in, h_in, oh, ow, num_taps(w_in, ow), num_taps(h_in, oh), mid, tiles, patches])
        tiles += -(-h_in // tile["BLOCK_R"]) * -(-ow // tile["BLOCK_C"])  # ceil divisions (triton.cdiv: 6 us a call)
        patches += (oh // PATCH) * (ow // PATCH)
        mid += 3 * h_in * ow
    return torch.tensor(records, dtype=torch.long), tiles, patches, mid


def crop_resample_triton(image, boxes, out_hw, out_dtype=torch.float32, hpass=None):
    """The same as crop_resample_ref, as two launches for all boxes (CUDA, or CPU with TRITON_INTERPRET=1).
    hpass: "dot" or "gather" (default HPASS)."""
    image = image.contiguous()
    hpass = hpass or HPASS
    records, tiles, patches, n_mid = plan(boxes, out_hw, hpass)
    records = records.to(image.device)
    k, max_k = len(out_hw), triton.next_power_of_2(len(out_hw))
    mid = torch.empty(n_mid, dtype=torch.float32, device=image.device)
    out = torch.empty(patches, 3 * TEMPORAL * PATCH * PATCH, dtype=out_dtype, device=image.device)
    kernel, tile = HPASSES[hpass]
    kernel[(tiles,)](image, mid, records, k, image.shape[1], MAX_K=max_k, **tile)
    _vpass_kernel[(patches,)](mid, out, records, k, *MEAN, *(1.0 / s for s in STD), MAX_K=max_k,
                              BLOCK=VPASS_BLOCK)
    return out
