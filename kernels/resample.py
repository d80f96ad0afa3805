"""Crop + resample + normalise + patchify: an original uint8 image to Qwen2.5-VL's `pixel_values`.

What is fused: cutting a box out of the original, PIL-style antialiased bicubic resampling to the
smart_resize'd size (a = -0.5, support widened by the scale when shrinking, sample centres at
(i + 0.5) * scale, taps kept inside the crop), x/255, CLIP mean/std, the 2-frame temporal repeat and the
2x2 merge-window patch order. Output rows: (gh/2, gw/2, 2, 2) windows; columns (channel, time, y, x).

Like PIL, both paths clip to 0..255 between the horizontal and the vertical pass.
`crop_resample_ref` is the torch reference (the CPU path and the kernel's test oracle); it converts only the
crop, not the whole original, to float. `crop_resample_triton` is one launch for all boxes: a program per
output patch (14x14 pixels, 3 channels) reads the uint8 original directly through PIL's separable filter
weights (tap starts and weights per output row and column, computed on the host) and writes its 2 x 3 x 196
values straight into the patch tensor. No float image is ever materialised. Limits: taps per output pixel
grow with the downscale (about 4 * scale + 1 per axis), so a 7680 -> 448 resize runs about 70 x 70 taps.
"""
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

def pil_weights(in_size, out_size, device=None):
    """PIL's antialiased bicubic filter along one axis: for each output index, the first input tap and the
    normalised weights (out_size, K), zero past the taps PIL keeps (which stay inside [0, in_size))."""
    scale = in_size / out_size
    fs = max(scale, 1.0)  # support widens by the scale when shrinking
    support = 2.0 * fs  # bicubic support is 2
    center = (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * scale
    lo = torch.clamp(torch.trunc(center - support + 0.5), min=0)
    hi = torch.clamp(torch.trunc(center + support + 0.5), max=in_size)
    k = int(2 * torch.ceil(torch.tensor(support)).item() + 1)
    x = lo[:, None] + torch.arange(k, dtype=torch.float64, device=device)  # (out, K) input positions
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


@triton.jit
def _crop_resample_kernel(
    img_ptr,  # uint8 original (H, W, 3), contiguous
    out_ptr,  # (num_patches, 1176) float32 or bfloat16
    patch_out_ptr,  # per patch: its row in out
    patch_y_ptr, patch_x_ptr,  # per patch: index of its first output row / column in the tap tables
    y_start_ptr, wy_ptr,  # per output row (all boxes stacked): absolute first input row, weights (., KY)
    x_start_ptr, wx_ptr,  # per output column: absolute first input column, weights (., KX)
    W, KY, KX,
    m0, m1, m2, s0, s1, s2,  # CLIP mean and 1/std per channel
    BLOCK: tl.constexpr,  # 16 >= the patch side 14
):
    p = tl.program_id(0)
    row = tl.load(patch_out_ptr + p)
    i = tl.arange(0, BLOCK)
    ok = i < 14
    ys = tl.load(patch_y_ptr + p) + i  # this patch's 14 output rows (+2 masked)
    xs = tl.load(patch_x_ptr + p) + i
    y0 = tl.load(y_start_ptr + ys, mask=ok, other=0)
    x0 = tl.load(x_start_ptr + xs, mask=ok, other=0)
    r = tl.zeros([BLOCK, BLOCK], tl.float32)
    g = tl.zeros([BLOCK, BLOCK], tl.float32)
    b = tl.zeros([BLOCK, BLOCK], tl.float32)
    # PIL's two passes: for each vertical tap ty, the horizontal pass at input row y0[y] + ty,
    # hr(x) = sum_j wx[x, j] img[y0[y] + ty, x0[x] + j], clipped to 0..255 as PIL's uint8 store does; then
    # out(y, x) = sum_ty wy[y, ty] hr, clipped again. Padded taps have weight 0.
    for ty in range(0, KY):
        wy = tl.load(wy_ptr + ys * KY + ty, mask=ok, other=0.0)
        yy = y0 + ty
        hr = tl.zeros([BLOCK, BLOCK], tl.float32)
        hg = tl.zeros([BLOCK, BLOCK], tl.float32)
        hb = tl.zeros([BLOCK, BLOCK], tl.float32)
        for tx in range(0, KX):
            wx = tl.load(wx_ptr + xs * KX + tx, mask=ok, other=0.0)
            keep = (ok & (wy != 0.0))[:, None] & (ok & (wx != 0.0))[None, :]  # never read past the crop
            px = img_ptr + ((yy[:, None] * W + (x0 + tx)[None, :]) * 3)
            hr += wx[None, :] * tl.load(px, mask=keep, other=0).to(tl.float32)
            hg += wx[None, :] * tl.load(px + 1, mask=keep, other=0).to(tl.float32)
            hb += wx[None, :] * tl.load(px + 2, mask=keep, other=0).to(tl.float32)
        r += wy[:, None] * _to_u8(hr)
        g += wy[:, None] * _to_u8(hg)
        b += wy[:, None] * _to_u8(hb)
    # x/255 and CLIP normalisation
    r = (_to_u8(r) / 255.0 - m0) * s0
    g = (_to_u8(g) / 255.0 - m1) * s1
    b = (_to_u8(b) / 255.0 - m2) * s2
    # columns (channel, time, y, x): each channel's 14x14 block, written for both frames
    offs = row * 1176 + i[:, None] * 14 + i[None, :]
    mask = ok[:, None] & ok[None, :]
    dt = out_ptr.dtype.element_ty
    for t in range(0, 2):
        tl.store(out_ptr + offs + t * 196, r.to(dt), mask=mask)
        tl.store(out_ptr + offs + 392 + t * 196, g.to(dt), mask=mask)
        tl.store(out_ptr + offs + 784 + t * 196, b.to(dt), mask=mask)


def _tap_tables(boxes, out_hw, device):
    """Stack every box's per-axis taps; absolute input starts; per patch, where its rows/columns begin."""
    y_start, wy, x_start, wx, patch_y, patch_x = [], [], [], [], [], []
    ny = nx = 0
    for (x1, y1, x2, y2), (oh, ow) in zip(boxes.tolist(), out_hw):
        lo_y, w_y = pil_weights(int(y2) - int(y1), oh, device)
        lo_x, w_x = pil_weights(int(x2) - int(x1), ow, device)
        y_start.append(lo_y + int(y1))
        x_start.append(lo_x + int(x1))
        wy.append(w_y)
        wx.append(w_x)
        gh, gw = oh // PATCH, ow // PATCH
        # patches in Qwen's order: 2x2 merge windows, row-major over windows
        bh, bw, mh, mw = torch.meshgrid(torch.arange(gh // MERGE), torch.arange(gw // MERGE),
                                        torch.arange(MERGE), torch.arange(MERGE), indexing="ij")
        patch_y.append(ny + ((bh * MERGE + mh) * PATCH).flatten())
        patch_x.append(nx + ((bw * MERGE + mw) * PATCH).flatten())
        ny, nx = ny + oh, nx + ow

    def pad_cat(ws):
        k = max(w.shape[1] for w in ws)
        return torch.cat([F.pad(w, (0, k - w.shape[1])) for w in ws]).contiguous(), k

    wy, ky = pad_cat(wy)
    wx, kx = pad_cat(wx)
    return (torch.cat(y_start), wy, ky, torch.cat(x_start), wx, kx,
            torch.cat(patch_y).to(device), torch.cat(patch_x).to(device))


def crop_resample_triton(image, boxes, out_hw, out_dtype=torch.float32):
    """The same as crop_resample_ref, in one launch for all boxes (CUDA, or CPU with TRITON_INTERPRET=1)."""
    image = image.contiguous()
    dev = image.device
    y_start, wy, ky, x_start, wx, kx, patch_y, patch_x = _tap_tables(boxes, out_hw, dev)
    n = patch_y.numel()
    out = torch.empty(n, 3 * TEMPORAL * PATCH * PATCH, dtype=out_dtype, device=dev)
    _crop_resample_kernel[(n,)](
        image, out, torch.arange(n, device=dev), patch_y, patch_x, y_start, wy, x_start, wx,
        image.shape[1], ky, kx, *MEAN, *(1.0 / s for s in STD), BLOCK=16)
    return out
