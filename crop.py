"""Pixels and boxes: Qwen2.5-VL's smart_resize, box checks and frame mapping, image encoding.

The model is shown a *global* image (the original resized to a token budget; in stage 1, to the sample's
information-gap level instead). Its tool calls name boxes in that shown frame; we map them to the
original frame and cut the crop from the original, so a crop carries detail the global image lacks.

    from crop import encode_image; pv, grid = encode_image(pil_image, box=None, max_pixels=1024 * 28 * 28)
"""
import math

import torch
from PIL import Image, ImageDraw

import kernels

FACTOR = 28  # patch 14 x merge 2: one language-model token covers 28x28 pixels
MIN_PIXELS = 4 * FACTOR * FACTOR
MIN_SIDE = 28  # a crop smaller than this is grown about its centre [choice]
MAX_ASPECT = 100  # crops more elongated than this are refused
MAX_IMAGE_ASPECT = 200  # Qwen's smart_resize refuses images more elongated than this (data.py refuses them at load)


class BadImage(ValueError):
    """An image that cannot be used; the message names the file and says why (data.Sample.image raises it)."""

    def __init__(self, message, sample_id=None):
        super().__init__(message)
        self.sample_id = sample_id


def parse_budgets(text, option):
    """Token budgets joined by commas ("4096,1024,256": an info-gap ladder, a sweep): whole numbers of at least 4
    tokens (an image's least), each once. A bad one stops, naming the option."""
    try:
        budgets = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        budgets = []
    if not budgets:
        raise SystemExit(f"error: {option} {text!r}: expected token budgets, whole numbers joined by commas")
    if min(budgets) < 4:
        raise SystemExit(f"error: {option} {text!r}: a budget is at least 4 tokens")
    twice = next((b for b in budgets if budgets.count(b) > 1), None)
    if twice is not None:
        raise SystemExit(f"error: {option} {text!r}: {twice} twice")
    return budgets


def tokens_to_pixels(tokens):
    """A budget in language-model tokens -> max_pixels (one token is 28x28 pixels)."""
    return int(tokens) * FACTOR * FACTOR


def smart_resize(height, width, factor=FACTOR, min_pixels=MIN_PIXELS, max_pixels=16384 * FACTOR * FACTOR):
    """Qwen's rule: sides to multiples of `factor` (Python round), area scaled into [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > MAX_IMAGE_ASPECT:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over {MAX_IMAGE_ASPECT}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_uint8(image):
    """PIL image (any mode) or uint8 (H, W, 3) tensor -> uint8 (H, W, 3) tensor, RGB."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) tensor, got {tuple(image.shape)} {image.dtype}")
        return image
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)


def check_box(box, shown_wh, orig_wh, min_side=MIN_SIDE, max_aspect=MAX_ASPECT):
    """A box the model named in the shown frame -> (integer box in the original frame, None) or (None, why).

    Checks: four finite numbers, x2 > x1 and y2 > y1, overlaps the image. Then: mapped to the original frame,
    clamped, grown about its centre to `min_side`, and refused if more elongated than `max_aspect`."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None, "bbox_2d must be a list of four numbers [x1, y1, x2, y2]"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        return None, "bbox_2d must hold numbers only"
    try:
        box = [float(v) for v in box]
    except OverflowError:
        return None, "bbox_2d holds a number too large"
    if not all(math.isfinite(v) for v in box):
        return None, "bbox_2d holds a non-finite number"
    x1, y1, x2, y2 = map_box(box, shown_wh, orig_wh)
    if x2 <= x1 or y2 <= y1:
        return None, f"empty or inverted box {list(box)}: need x1 < x2 and y1 < y2"
    W, H = orig_wh
    x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(W), x2), min(float(H), y2)
    if x2 <= x1 or y2 <= y1:
        return None, f"box {list(box)} lies outside the image ({shown_wh[0]}x{shown_wh[1]})"
    x1, x2 = _grow(x1, x2, min_side, W)
    y1, y2 = _grow(y1, y2, min_side, H)
    x1, y1, x2, y2 = round(x1), round(y1), round(x2), round(y2)
    if max(x2 - x1, y2 - y1) / min(x2 - x1, y2 - y1) > max_aspect:
        return None, f"box {list(box)} is more elongated than {max_aspect}:1"
    return (x1, y1, x2, y2), None


def fit_box(box, wh, min_side=MIN_SIDE, max_aspect=MAX_ASPECT):
    """A box not of the model's making (the gt-box probe's), in the pixels of an image of size wh -> the integer
    box the tool cuts: clamped, each side grown about its centre to min_side and to 1/max_aspect of the longer
    (a thin annotated box is a valid crop, where the model's would be refused)."""
    W, H = wh
    x1, y1, x2, y2 = max(0.0, box[0]), max(0.0, box[1]), min(float(W), box[2]), min(float(H), box[3])
    side = max(min_side, max(x2 - x1, y2 - y1) / max_aspect)
    x1, x2 = _grow(x1, x2, side, W)
    y1, y2 = _grow(y1, y2, side, H)
    return round(x1), round(y1), round(x2), round(y2)


def _grow(lo, hi, min_side, limit):
    """Grow [lo, hi) about its centre to at least min_side, shifted to stay inside [0, limit)."""
    if hi - lo >= min_side:
        return lo, hi
    side = min(min_side, limit)
    lo = min(max(0.0, (lo + hi - side) / 2), limit - side)
    return lo, lo + side


def map_box(box, from_wh, to_wh):
    """Scale a box (x1, y1, x2, y2) from one pixel frame (width, height) to another."""
    sx, sy = to_wh[0] / from_wh[0], to_wh[1] / from_wh[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def shown_size(orig_wh, max_pixels):
    """(width, height) of the global image the model sees: the original under smart_resize."""
    h, w = smart_resize(orig_wh[1], orig_wh[0], max_pixels=max_pixels)
    return w, h


def encode_image(image, box=None, *, max_pixels):
    """Image (PIL or uint8 (H, W, 3)) and an optional integer box in original pixels -> (pixel_values
    float32 (N, 1176), grid_thw long (1, 3)): Qwen2.5-VL's processor on the crop, in one resample."""
    return encode_crops(to_uint8(image), [box], max_pixels=max_pixels)


def encode_crops(image_u8, boxes, *, max_pixels=None, out_hw=None):
    """Many boxes of one uint8 image in one call (None = whole image) -> (pixel_values, grid_thw (K, 3)).
    Each crop is resized with smart_resize under max_pixels, or to the given `out_hw` sizes (multiples of 28)."""
    H, W, _ = image_u8.shape
    # whole pixels, rounded as PIL's Image.crop rounds (the resample would truncate a fractional box)
    boxes = [(0, 0, W, H) if b is None else tuple(round(v) for v in b) for b in boxes]
    if out_hw is None:
        out_hw = [smart_resize(y2 - y1, x2 - x1, max_pixels=max_pixels) for x1, y1, x2, y2 in boxes]
    pv = kernels.crop_resample(image_u8, torch.tensor(boxes, dtype=torch.float32), out_hw)
    grids = torch.tensor([[1, h // 14, w // 14] for h, w in out_hw], dtype=torch.long)
    return pv, grids


def crop_size(box, shown_wh, orig_wh, max_pixels, floor=True):
    """(height, width) a crop of `box` (original pixels) is sent back at: smart_resize under the crop budget,
    but (floor) never coarser than the global image it was cut from (pixels per original pixel, on each axis),
    which a small crop budget would otherwise make it for a large box."""
    x1, y1, x2, y2 = box
    h, w = smart_resize(y2 - y1, x2 - x1, max_pixels=max_pixels)
    if not floor:
        return h, w
    floor_h = math.ceil((y2 - y1) * shown_wh[1] / orig_wh[1] / FACTOR) * FACTOR
    floor_w = math.ceil((x2 - x1) * shown_wh[0] / orig_wh[0] / FACTOR) * FACTOR
    return max(h, floor_h), max(w, floor_w)


def resized(image, max_pixels):
    """The PIL image the model is shown under a budget: the same-resolution baseline cuts its crops from it."""
    w, h = shown_size(image.size, max_pixels)
    return image.convert("RGB").resize((w, h), Image.BICUBIC)


def noise_image(width, height, seed):
    """Uniform noise of a crop's size: the noise-replace probe swaps a returned crop for this."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=g)


def add_noise(image_u8, sigma, seed):
    """The noise probe as the paper describes it: Gaussian noise of standard deviation `sigma` (in 0..255
    pixel levels) added to a crop's pixels, clipped to 0..255."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(image_u8.shape, generator=g) * sigma
    return (image_u8.cpu().float() + noise).round().clamp(0, 255).to(torch.uint8).to(image_u8.device)


def draw_boxes(image, boxes, colors=("red", "lime", "cyan", "yellow"), width=4):
    """A copy of the image with boxes (original frame) drawn, for the HTML report."""
    image = image.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    for i, b in enumerate(boxes):
        draw.rectangle(list(b), outline=colors[i % len(colors)], width=width)
    return image
