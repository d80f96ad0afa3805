"""Crop + resample + normalise + patchify: an original uint8 image to Qwen2.5-VL's `pixel_values`.

What is fused: cutting a box out of the original, PIL-style antialiased bicubic resampling to the
smart_resize'd size (a = -0.5, support widened by the scale when shrinking, sample centres at
(i + 0.5) * scale, taps kept inside the crop), x/255, CLIP mean/std, the 2-frame temporal repeat and the
2x2 merge-window patch order. Output rows: (gh/2, gw/2, 2, 2) windows; columns (channel, time, y, x).

Like PIL, both paths clip to 0..255 between the horizontal and the vertical pass.
`crop_resample_ref` is the torch reference (the CPU path and the kernel's test oracle); it converts only the
crop, not the whole original, to float. `crop_resample_triton` is PIL's separable filter as two launches
for all boxes: a horizontal pass (programs over 16 crop rows x 64 output columns) reads the uint8 original
and writes an fp32 intermediate (3, crop rows, output width) per box; a vertical pass (a program per output
patch of 14x14 pixels) reads it along contiguous rows, normalises, and writes 2 x 3 x 196 values straight
into the patch tensor. Each program loops over its own box's tap count (about 4 * scale + 1 per axis), so a
small crop does not pay for a large one beside it. The tap tables (starts and weights per output row and
column) are computed on the host, cached by (input, output) size, and go to the device in two copies.
Limits: the intermediate holds 12 bytes per (crop row x output column): 60 MB for an 8K original at 1,024
tokens.
"""
import functools
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
        crop = F.interpolate(crop, size=(crop.shape[2], ow), mode="bicubic", antialias=True, align_corners=False)
        crop = crop.clamp_(0.0, 255.0)
        crop = F.interpolate(crop, size=(oh, ow), mode="bicubic", antialias=True, align_corners=False)[0]
        crop = crop.clamp_(0.0, 255.0)
        out.append(patchify((crop / 255.0 - mean) / std))
    return torch.cat(out).to(out_dtype)


# ---------------------------------------------------------------- Triton

@functools.lru_cache(maxsize=4096)
def pil_weights(in_size, out_size):
    """PIL's antialiased bicubic filter along one axis: for each output index, the first input tap and the
    normalised weights (out_size, K), zero past the taps PIL keeps (which stay inside [0, in_size)). CPU
    tensors, cached by size: crops of a step share few sizes, and nothing here waits on a device."""
    scale = in_size / out_size
    fs = max(scale, 1.0)  # support widens by the scale when shrinking
    support = 2.0 * fs  # bicubic support is 2
    center = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    lo = torch.clamp(torch.trunc(center - support + 0.5), min=0)
    hi = torch.clamp(torch.trunc(center + support + 0.5), max=in_size)
    k = int(2 * math.ceil(support) + 1)
    x = lo[:, None] + torch.arange(k, dtype=torch.float64)  # (out, K) input positions
    u = ((x - center[:, None] + 0.5) / fs).abs()
    a = -0.5
    w = torch.where(u < 1, ((a + 2) * u - (a + 3)) * u * u + 1,
                    torch.where(u < 2, (((u - 5) * u + 8) * u - 4) * a, torch.zeros_like(u)))
    w = torch.where(x < hi[:, None], w, torch.zeros_like(w))
    w = w / w.sum(1, keepdim=True)
    return lo.long(), w.float()


@triton.jit
def _to_u8(x):
    """PIL stores each pass as uint8: clip to 0..255 (its rounding is left out, as in the reference)."""
    return tl.minimum(tl.maximum(x, 0.0), 255.0)


# Per box, one int64 record of BOX_FIELDS values, read by both passes: its crop's top row and height, its output
# width, where its column taps and weights start and their count, the same for its rows, where its
# intermediate planes start (offsets into the tables `_tables` packs)
Y1, H_IN, OW, X_LO, WX_AT, KX, Y_LO, WY_AT, KY, MID_AT, BOX_FIELDS = (tl.constexpr(i) for i in range(11))


@triton.jit
def _hpass_kernel(
    img_ptr,  # uint8 original (H, W, 3), contiguous
    mid_ptr,  # out: fp32 intermediate, per box (3, H_IN, OW) planes from its MID_AT
    boxes_ptr,  # int64 (K, BOX_FIELDS) box records
    tiles_ptr,  # int32 (T, 3): per program its box, first crop row, first output column
    taps_ptr,  # int64: first input column of each output column, all boxes (X_LO offsets into it)
    w_ptr,  # fp32: tap weights, all boxes and both axes (WX_AT, WY_AT offsets into it), row-major (out, K)
    W,  # the original's width
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # horizontal pass over BLOCK_R crop rows x BLOCK_C output columns:
    # mid[c, y, x] = clip(sum_j wx[x, j] img[y1 + y, x0[x] + j, c]); the box's own tap count bounds the loop
    box = boxes_ptr + tl.load(tiles_ptr + tl.program_id(0) * 3).to(tl.int64) * BOX_FIELDS
    ys = tl.load(tiles_ptr + tl.program_id(0) * 3 + 1) + tl.arange(0, BLOCK_R)
    xs = tl.load(tiles_ptr + tl.program_id(0) * 3 + 2) + tl.arange(0, BLOCK_C)
    h_in, ow, kx = tl.load(box + H_IN), tl.load(box + OW), tl.load(box + KX).to(tl.int32)  # a loop bound
    y_ok, x_ok = ys < h_in, xs < ow
    x0 = tl.load(taps_ptr + tl.load(box + X_LO) + xs, mask=x_ok, other=0)  # absolute first input column
    rows = (tl.load(box + Y1) + ys).to(tl.int64)[:, None] * W  # int64: an 8K image has 33M pixels x 3
    r = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    g = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    b = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for j in range(0, kx):
        wx = tl.load(w_ptr + tl.load(box + WX_AT) + xs * kx + j, mask=x_ok, other=0.0)
        keep = y_ok[:, None] & (x_ok & (wx != 0.0))[None, :]  # never read past the crop
        px = img_ptr + (rows + (x0 + j)[None, :]) * 3
        r += wx[None, :] * tl.load(px, mask=keep, other=0).to(tl.float32)
        g += wx[None, :] * tl.load(px + 1, mask=keep, other=0).to(tl.float32)
        b += wx[None, :] * tl.load(px + 2, mask=keep, other=0).to(tl.float32)
    plane = h_in * ow
    at = mid_ptr + tl.load(box + MID_AT) + ys[:, None] * ow + xs[None, :]
    ok = y_ok[:, None] & x_ok[None, :]
    tl.store(at, _to_u8(r), mask=ok)
    tl.store(at + plane, _to_u8(g), mask=ok)
    tl.store(at + 2 * plane, _to_u8(b), mask=ok)


@triton.jit
def _vpass_kernel(
    mid_ptr,  # fp32 intermediate from _hpass_kernel
    out_ptr,  # out: (num_patches, 1176) float32 or bfloat16
    boxes_ptr,  # int64 (K, BOX_FIELDS) box records
    patches_ptr,  # int32 (P, 3): per program its box, first output row, first output column (its row in out = P)
    taps_ptr,  # int64: first crop row of each output row (Y_LO offsets into it)
    w_ptr,  # fp32 tap weights (WY_AT offsets into it)
    m0, m1, m2, s0, s1, s2,  # CLIP mean and 1/std per channel
    BLOCK: tl.constexpr,  # 16 >= the patch side 14
):
    # vertical pass for one 14x14 output patch: out[c, y, x] = clip(sum_t wy[y, t] mid[c, y0[y] + t, x]),
    # then x/255, CLIP normalisation, and the store in Qwen's patch layout
    p = tl.program_id(0)
    box = boxes_ptr + tl.load(patches_ptr + p * 3).to(tl.int64) * BOX_FIELDS
    i = tl.arange(0, BLOCK)
    ok = i < 14
    ys = tl.load(patches_ptr + p * 3 + 1) + i
    xs = tl.load(patches_ptr + p * 3 + 2) + i
    h_in, ow, ky = tl.load(box + H_IN), tl.load(box + OW), tl.load(box + KY).to(tl.int32)  # a loop bound
    y0 = tl.load(taps_ptr + tl.load(box + Y_LO) + ys, mask=ok, other=0)
    plane = h_in * ow
    r = tl.zeros([BLOCK, BLOCK], tl.float32)
    g = tl.zeros([BLOCK, BLOCK], tl.float32)
    b = tl.zeros([BLOCK, BLOCK], tl.float32)
    for t in range(0, ky):
        wy = tl.load(w_ptr + tl.load(box + WY_AT) + ys * ky + t, mask=ok, other=0.0)
        keep = (ok & (wy != 0.0))[:, None] & ok[None, :]
        at = mid_ptr + tl.load(box + MID_AT) + (y0 + t)[:, None] * ow + xs[None, :]  # contiguous along x
        r += wy[:, None] * tl.load(at, mask=keep, other=0.0)
        g += wy[:, None] * tl.load(at + plane, mask=keep, other=0.0)
        b += wy[:, None] * tl.load(at + 2 * plane, mask=keep, other=0.0)
    r = (_to_u8(r) / 255.0 - m0) * s0
    g = (_to_u8(g) / 255.0 - m1) * s1
    b = (_to_u8(b) / 255.0 - m2) * s2
    # columns (channel, time, y, x): each channel's 14x14 block, written for both frames
    offs = p.to(tl.int64) * 1176 + i[:, None] * 14 + i[None, :]
    mask = ok[:, None] & ok[None, :]
    dt = out_ptr.dtype.element_ty
    for f in range(0, 2):
        tl.store(out_ptr + offs + f * 196, r.to(dt), mask=mask)
        tl.store(out_ptr + offs + 392 + f * 196, g.to(dt), mask=mask)
        tl.store(out_ptr + offs + 784 + f * 196, b.to(dt), mask=mask)


HPASS_ROWS, HPASS_COLS = 16, 64  # the horizontal pass's tile
VPASS_BLOCK = 16  # the vertical pass's tile side: a power of 2 >= the patch side 14


@functools.lru_cache(maxsize=1024)
def _patch_order(oh, ow):
    """(first output row, first output column) of each patch in Qwen's order: 2x2 merge windows, row-major."""
    gh, gw = oh // PATCH, ow // PATCH
    bh, bw, mh, mw = torch.meshgrid(torch.arange(gh // MERGE), torch.arange(gw // MERGE), torch.arange(MERGE),
                                    torch.arange(MERGE), indexing="ij")
    return torch.stack([((bh * MERGE + mh) * PATCH).flatten(), ((bw * MERGE + mw) * PATCH).flatten()], 1)


def _tables(boxes, out_hw):
    """Every table both passes read, built on the host from cached per-size pieces (no device sync):
    box records, h-pass tiles, patches, tap starts, tap weights; and the intermediate's size."""
    records, tiles, patches, taps, weights = [], [], [], [], []
    n_taps = n_w = n_mid = 0
    for k, ((x1, y1, x2, y2), (oh, ow)) in enumerate(zip(boxes.tolist(), out_hw)):
        x1, y1, h_in = int(x1), int(y1), int(y2) - int(y1)
        lo_x, w_x = pil_weights(int(x2) - x1, ow)
        lo_y, w_y = pil_weights(h_in, oh)
        records.append([y1, h_in, ow, n_taps, n_w, w_x.shape[1], n_taps + ow, n_w + w_x.numel(), w_y.shape[1],
                        n_mid])
        taps += [lo_x + x1, lo_y]  # columns absolute, rows relative to the crop (the intermediate's rows)
        weights += [w_x.flatten(), w_y.flatten()]
        n_taps, n_w, n_mid = n_taps + ow + oh, n_w + w_x.numel() + w_y.numel(), n_mid + 3 * h_in * ow
        ty, tx = torch.meshgrid(torch.arange(0, h_in, HPASS_ROWS), torch.arange(0, ow, HPASS_COLS), indexing="ij")
        tiles.append(torch.stack([torch.full_like(ty.flatten(), k), ty.flatten(), tx.flatten()], 1))
        order = _patch_order(oh, ow)
        patches.append(torch.cat([torch.full((len(order), 1), k), order], 1))
    return (torch.tensor(records, dtype=torch.long), torch.cat(tiles).int(), torch.cat(patches).int(),
            torch.cat(taps), torch.cat(weights), n_mid)


def crop_resample_triton(image, boxes, out_hw, out_dtype=torch.float32):
    """The same as crop_resample_ref, as two launches for all boxes (CUDA, or CPU with TRITON_INTERPRET=1)."""
    image = image.contiguous()
    dev = image.device
    records, tiles, patches, taps, weights, n_mid = _tables(boxes.cpu(), out_hw)
    # two host->device copies for every table: the integers packed in one tensor, the weights in another
    ints = torch.cat([records.flatten(), tiles.long().flatten(), patches.long().flatten(), taps]).to(dev)
    records, tiles, patches, taps = ints.split([records.numel(), tiles.numel(), patches.numel(), taps.numel()])
    weights = weights.to(dev)
    mid = torch.empty(n_mid, dtype=torch.float32, device=dev)
    n = len(patches) // 3
    out = torch.empty(n, 3 * TEMPORAL * PATCH * PATCH, dtype=out_dtype, device=dev)
    _hpass_kernel[(len(tiles) // 3,)](image, mid, records, tiles.int(), taps, weights, image.shape[1],
                                      BLOCK_R=HPASS_ROWS, BLOCK_C=HPASS_COLS)
    _vpass_kernel[(n,)](mid, out, records, patches.int(), taps, weights, *MEAN, *(1.0 / s for s in STD),
                        BLOCK=VPASS_BLOCK)
    return out
