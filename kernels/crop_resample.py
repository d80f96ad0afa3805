"""Crop + resample + normalise + patchify: an original uint8 image to Qwen2.5-VL's `pixel_values`.

What is fused: cutting a box out of the original, PIL-style antialiased bicubic resampling to the
smart_resize'd size (a = -0.5, support widened by the scale when shrinking, sample centres at
(i + 0.5) * scale, taps kept inside the crop), x/255, CLIP mean/std, the 2-frame temporal repeat and the
2x2 merge-window patch order. Output rows: (gh/2, gw/2, 2, 2) windows; columns (channel, time, y, x).

This file holds the torch reference (`crop_resample_ref`), which is the CPU path and the test oracle for a
Triton kernel. The reference converts only the crop (not the whole original) to float.
"""
import torch
import torch.nn.functional as F

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


def crop_resample_ref(image, boxes, out_hw):
    """image: uint8 (H, W, 3); boxes: (K, 4) integer-valued x1, y1, x2, y2 (x2, y2 exclusive);
    out_hw: K (h, w) pairs (multiples of 28). Returns float32 (sum_k h_k*w_k/196, 1176)."""
    mean = torch.tensor(MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(STD, device=image.device).view(3, 1, 1)
    out = []
    for (x1, y1, x2, y2), (oh, ow) in zip(boxes.tolist(), out_hw):
        crop = image[int(y1):int(y2), int(x1):int(x2)].permute(2, 0, 1).unsqueeze(0).float()  # (1, 3, h, w)
        # torch's antialiased bicubic is PIL's filter (a = -0.5, widened support, renormalised edge taps)
        crop = F.interpolate(crop, size=(oh, ow), mode="bicubic", antialias=True, align_corners=False)[0]
        crop = crop.clamp_(0.0, 255.0)  # bicubic overshoots at hard edges; PIL's uint8 output clips there too
        out.append(patchify((crop / 255.0 - mean) / std))
    return torch.cat(out)
