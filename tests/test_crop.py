"""crop.py and kernels/resample.py against Qwen2-VL's own image processor (transformers, PIL backend).

All images are generated here from fixed seeds; nothing is read from disk or the network.
"""
import ast
import importlib.util
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import crop
from kernels.resample import MEAN, STD, patchify
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_pil

TOK = 28 * 28  # pixels per language-model token


# ------------------------------------------------------------------ oracles

def _hf_smart_resize():
    """transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize.

    That module imports torchvision at the top, which this project does not install (it breaks beside the
    CPU torch build), so when the import fails the function is compiled from that module's own source text.
    It needs only `math`."""
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
        return smart_resize
    except ImportError:
        spec = importlib.util.find_spec("transformers.models.qwen2_vl.image_processing_qwen2_vl")
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        fn = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize"]
        assert len(fn) == 1, "transformers' smart_resize not found in image_processing_qwen2_vl.py"
        ns = {"math": math}
        exec(compile(ast.Module(body=fn, type_ignores=[]), spec.origin, "exec"), ns)
        return ns["smart_resize"]


HF_SMART_RESIZE = _hf_smart_resize()


def oracle(pil_crop, max_pixels, min_pixels=crop.MIN_PIXELS):
    """Qwen2-VL's processor (PIL backend) on an already-cut crop -> (pixel_values, image_grid_thw)."""
    proc = hf_pil.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = proc(images=[pil_crop], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def deviation(pv, ref):
    d = (pv - ref).abs()
    return d.mean().item(), (d > 0.1).float().mean().item()


MEAN_TOL = 0.04  # mean |delta| over all values (normalised units: 1.0 is about 70 grey levels)
FRAC_TOL = 0.01  # share of values off by more than 0.1 (about 7 grey levels)
# every value of a photo-like image (not a pixel checkerboard): within 2 grey levels (one is 1/255/std, about
# 0.0145). PIL rounds each pass to whole levels and we do not: 0.0164 at most over CASES, 0.005 on average
MAX_TOL = 0.025


# ------------------------------------------------------------------ smart_resize

SMART_RESIZE_TABLE = [
    # (h, w, min_pixels, max_pixels)
    # tiny
    (1, 1, 4 * TOK, 1024 * TOK),
    (3, 27, 4 * TOK, 1024 * TOK),
    (10, 10, 4 * TOK, 16 * TOK),
    (27, 27, 4 * TOK, 4 * TOK),
    (28, 28, 4 * TOK, 4 * TOK),
    (1, 200, 4 * TOK, 1024 * TOK),  # aspect exactly 200 is allowed
    (13, 50, 56 * 56, 28 * 28 * 1280),
    # huge
    (4096, 4096, 4 * TOK, 1024 * TOK),
    (8192, 6000, 4 * TOK, 16384 * TOK),
    (20000, 30000, 4 * TOK, 16384 * TOK),
    (30000, 20000, 4 * TOK, 64 * TOK),
    (100000, 99999, 4 * TOK, 1024 * TOK),
    # elongated, aspect up to 150
    (28, 4200, 4 * TOK, 1024 * TOK),
    (4200, 28, 4 * TOK, 1024 * TOK),
    (10, 1500, 4 * TOK, 1024 * TOK),
    (1500, 10, 4 * TOK, 64 * TOK),
    (56, 8400, 4 * TOK, 64 * TOK),  # max(factor, ...) keeps one side at 28: area ends above max_pixels
    (3, 450, 4 * TOK, 4 * TOK),
    (2000, 14, 4 * TOK, 256 * TOK),
    (123, 17000, 4 * TOK, 16384 * TOK),
    # exact multiples of 28
    (224, 224, 4 * TOK, 1024 * TOK),
    (448, 672, 4 * TOK, 1024 * TOK),
    (28 * 32, 28 * 32, 4 * TOK, 1024 * TOK),  # exactly max_pixels: unchanged
    (28 * 33, 28 * 32, 4 * TOK, 1024 * TOK),  # just over max_pixels
    (56, 56, 4 * TOK, 1024 * TOK),  # exactly min_pixels: unchanged
    (56, 28, 4 * TOK, 1024 * TOK),  # just under min_pixels
    # half-way rounding (Python's round: halves go to the even multiple)
    (42, 42, 4 * TOK, 1024 * TOK),  # 1.5 -> 2
    (70, 70, 4 * TOK, 1024 * TOK),  # 2.5 -> 2
    (98, 126, 4 * TOK, 1024 * TOK),  # 3.5 -> 4, 4.5 -> 4
    (154, 182, 4 * TOK, 1024 * TOK),  # 5.5 -> 6, 6.5 -> 6
    (41, 43, 4 * TOK, 1024 * TOK),
    (434, 462, 4 * TOK, 256 * TOK),  # 15.5, 16.5 and over the budget
    # odd budgets
    (500, 700, 100 * TOK, 200 * TOK),
    (500, 700, 1000, 5000),
    (777, 333, 56 * 56, 28 * 28 * 1280),
]


@pytest.mark.parametrize("h,w,min_pixels,max_pixels", SMART_RESIZE_TABLE)
def test_smart_resize_matches_transformers(h, w, min_pixels, max_pixels):
    got = crop.smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
    assert got == HF_SMART_RESIZE(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    assert got == hf_pil.smart_resize(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    assert got[0] % 28 == 0 and got[1] % 28 == 0 and min(got) >= 28


def test_smart_resize_table_values_by_hand():
    # a few values worked out by hand, so the table above does not only compare two equal copies
    assert crop.smart_resize(70, 70, min_pixels=4 * TOK, max_pixels=1024 * TOK) == (56, 56)  # 2.5 -> 2
    assert crop.smart_resize(98, 126, min_pixels=4 * TOK, max_pixels=1024 * TOK) == (112, 112)  # 3.5 -> 4, 4.5 -> 4
    assert crop.smart_resize(28 * 32, 28 * 32, min_pixels=4 * TOK, max_pixels=1024 * TOK) == (896, 896)
    assert crop.smart_resize(28 * 33, 28 * 32, min_pixels=4 * TOK, max_pixels=1024 * TOK) == (896, 868)
    assert crop.smart_resize(10, 10, min_pixels=4 * TOK, max_pixels=16 * TOK) == (56, 56)
    assert crop.smart_resize(500, 1000, max_pixels=1024 * TOK) == (504, 1008)


def test_smart_resize_matches_transformers_random():
    rng = random.Random(7)
    budgets = [4, 16, 64, 256, 1024, 4096, 16384]
    for _ in range(3000):
        h = int(math.exp(rng.uniform(0, math.log(20000))))
        w = max(1, min(int(h * math.exp(rng.uniform(-math.log(190), math.log(190)))), 50000))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = rng.choice(budgets[:3])
        hi = rng.choice([b for b in budgets if b >= lo])
        args = dict(min_pixels=lo * TOK, max_pixels=hi * TOK)
        assert crop.smart_resize(h, w, **args) == HF_SMART_RESIZE(h, w, factor=28, **args), (h, w, args)


@pytest.mark.parametrize("h,w", [(1, 201), (201, 1), (10, 2001), (2001, 10), (3, 700), (5, 100000)])
def test_smart_resize_refuses_aspect_over_200(h, w):
    with pytest.raises(ValueError):
        HF_SMART_RESIZE(h, w)  # the oracle refuses them too
    with pytest.raises(ValueError, match="200"):
        crop.smart_resize(h, w, min_pixels=4 * TOK, max_pixels=1024 * TOK)


def test_tokens_and_shown_size():
    assert crop.tokens_to_pixels(64) == 64 * 784
    assert crop.MIN_PIXELS == 4 * 784
    # (width, height) order: a wide image stays wide
    assert crop.shown_size((1000, 500), 1024 * TOK) == (1008, 504)
    assert crop.shown_size((500, 1000), 1024 * TOK) == (504, 1008)
    w, h = crop.shown_size((3000, 2000), 64 * TOK)
    assert (w * h <= 64 * TOK) and w > h
    im = Image.new("L", (300, 120), 9)
    shown = crop.resized(im, 16 * TOK)
    assert shown.size == crop.shown_size((300, 120), 16 * TOK) and shown.mode == "RGB"


# ------------------------------------------------------------------ image generators

WORDS = "lorem ipsum dolor 0123 SIT amet QUIZ fox 987 jump Wx# lazy dog".split()


def smooth_image(seed, w, h):
    """Photo-like: coarse uniform noise upscaled bilinearly."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def text_image(seed, w, h):
    """Sharp small text (PIL's default font at 8-20 px) in dark ink on light paper, and some light on dark."""
    g = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in g.integers(190, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(int(np.clip(w * h // 3000, 6, 120))):
        x, y = int(g.integers(-20, w)), int(g.integers(-10, h))
        if g.random() < 0.15:
            d.rectangle([x, y, x + int(g.integers(20, 120)), y + int(g.integers(10, 30))], fill=(20, 20, 40))
            ink = (250, 250, 250)
        else:
            ink = tuple(int(v) for v in g.integers(0, 70, 3))
        line = " ".join(g.choice(WORDS, size=int(g.integers(1, 5))))
        d.text((x, y), line, fill=ink, font=ImageFont.load_default(size=int(g.integers(8, 21))))
    return img


def checker_image(seed, w, h, cell=1):
    """A checkerboard; cell=1 is the pixel-level one (every neighbour differs by 255)."""
    yy, xx = np.mgrid[0:h, 0:w]
    a = (((yy // cell) + (xx // cell)) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([a, 255 - a, (a // 2 + 64).astype(np.uint8)], -1))


MAKERS = dict(smooth=smooth_image, text=text_image, checker=checker_image)
BOX_KINDS = ("whole", "border", "tiny", "inner", "sliver")
BUDGETS = (4, 16, 64, 256, 1024)  # tokens: 4 * 784 up to 1024 * 784 pixels


def _random_box(rng, kind, w, h):
    if kind == "whole":
        return (0, 0, w, h)
    if kind == "tiny":  # under 28 px on both sides: the processor upscales it to min_pixels
        bw, bh = rng.randint(3, min(27, w)), rng.randint(3, min(27, h))
    elif kind == "sliver":  # thin and long, aspect up to about 150
        if w >= h:
            bh = rng.randint(2, 8)
            bw = rng.randint(min(w, 20 * bh), min(w, 150 * bh))
        else:
            bw = rng.randint(2, 8)
            bh = rng.randint(min(h, 20 * bw), min(h, 150 * bw))
    else:
        bw, bh = rng.randint(28, w), rng.randint(28, h)
        if max(bw, bh) / min(bw, bh) > 150:
            bw, bh = min(bw, 150 * bh), min(bh, 150 * bw)
    if kind in ("border", "sliver"):  # touches one or two borders
        x1 = rng.choice((0, w - bw, rng.randint(0, w - bw)))
        y1 = rng.choice((0, h - bh)) if x1 not in (0, w - bw) else rng.randint(0, h - bh)
    else:
        x1, y1 = rng.randint(0, w - bw), rng.randint(0, h - bh)
    return (x1, y1, x1 + bw, y1 + bh)


def _make_cases(per_kind=20, seed=1234):
    """A fixed table of (kind, seed, w, h, box, budget) with every box kind and budget for every image kind."""
    rng = random.Random(seed)
    cases = []
    for kind in ("smooth", "text", "checker"):
        for j in range(per_kind):
            w = int(math.exp(rng.uniform(math.log(60), math.log(1500))))
            h = int(math.exp(rng.uniform(math.log(60), math.log(1500))))
            while w * h > 500_000:  # keep it fast: one long side is fine, two are not needed
                w, h = (w * 3 // 4, h) if w > h else (w, h * 3 // 4)
            box_kind = BOX_KINDS[j % len(BOX_KINDS)]
            budget = BUDGETS[(j // len(BOX_KINDS) + j) % len(BUDGETS)]
            box = _random_box(rng, box_kind, w, h)
            cases.append((kind, rng.randrange(1 << 30), w, h, box, budget, box_kind))
    return cases


CASES = _make_cases()


def _case_id(c):
    kind, _, w, h, box, budget, box_kind = c
    return f"{kind}-{w}x{h}-{box_kind}-{'_'.join(map(str, box))}-{budget}tok"


def _encode_both(case):
    kind, seed, w, h, box, budget, _ = case
    img = MAKERS[kind](seed, w, h)
    ref_pv, ref_grid = oracle(img.crop(box), max_pixels=budget * TOK)
    pv, grid = crop.encode_image(img, box, max_pixels=budget * TOK)
    return pv, grid, ref_pv, ref_grid


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_encode_image_grid_matches_processor(case):
    pv, grid, ref_pv, ref_grid = _encode_both(case)
    assert grid.dtype == torch.long and pv.dtype == torch.float32
    assert grid.shape == (1, 3) and grid.tolist() == ref_grid.tolist()
    assert pv.shape == ref_pv.shape and pv.shape[1] == 1176
    assert pv.shape[0] == int(grid.prod())  # 4 patches per language-model token


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_encode_image_pixels_match_processor(case):
    pv, _, ref_pv, _ = _encode_both(case)
    mean, frac = deviation(pv, ref_pv)
    assert mean <= MEAN_TOL, f"mean |delta| {mean:.4f}"
    if case[0] != "checker":  # pixel-level checkerboards are exempt from the 1% rule, not from the mean
        assert frac <= FRAC_TOL, f"{frac:.2%} of values off by more than 0.1"
        assert (pv - ref_pv).abs().max() <= MAX_TOL


# ------------------------------------------------------------------ the tolerance means something

@pytest.mark.parametrize("budget", [1024, 64])
@pytest.mark.parametrize("dx,dy", [(1, 0), (0, 1), (-1, 0), (0, -1)])
def test_one_pixel_box_offset_breaks_the_bounds(dx, dy, budget):
    img = text_image(5, 320, 240)
    box = (33, 41, 290, 200)
    ref_pv, ref_grid = oracle(img.crop(box), max_pixels=budget * TOK)
    mean, frac = deviation(crop.encode_image(img, box, max_pixels=budget * TOK)[0], ref_pv)
    assert mean <= MEAN_TOL and frac <= FRAC_TOL  # the right box passes...
    shifted = (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)
    pv, grid = crop.encode_image(img, shifted, max_pixels=budget * TOK)
    assert grid.tolist() == ref_grid.tolist()  # same size, so only the pixels can tell
    mean, frac = deviation(pv, ref_pv)
    assert mean > MEAN_TOL and frac > FRAC_TOL  # ...a box one pixel off fails both bounds


def test_transposed_or_flipped_crop_breaks_the_bounds():
    img = smooth_image(3, 224, 224)
    ref_pv, _ = oracle(img, max_pixels=1024 * TOK)
    flipped = img.transpose(Image.FLIP_LEFT_RIGHT)
    assert deviation(crop.encode_image(flipped, None, max_pixels=1024 * TOK)[0], ref_pv)[0] > MEAN_TOL
    transposed = img.transpose(Image.TRANSPOSE)
    assert deviation(crop.encode_image(transposed, None, max_pixels=1024 * TOK)[0], ref_pv)[0] > MEAN_TOL


# ------------------------------------------------------------------ hard edges: clipping and PIL's two passes

def _edge_image(w=64, h=64):
    """Black left half, white right half: a hard edge."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, w // 2:] = 255
    return Image.fromarray(a)


def test_encode_image_stays_in_the_processors_value_range():
    # bicubic overshoots at a hard edge; PIL's uint8 output clips it, so the processor never leaves
    # [(0 - mean) / std, (1 - mean) / std]. Without a clamp in crop_resample_ref this went ~18 grey levels
    # below black here.
    img = _edge_image()
    box = (26, 20, 38, 32)  # 12x12 across the edge, upscaled to 56x56
    lo = torch.tensor([(0 - m) / s for m, s in zip(MEAN, STD)])  # black, per channel
    hi = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)])  # white

    def channel_range(pv):
        per_channel = pv.view(-1, 3, 2 * 14 * 14).transpose(0, 1).reshape(3, -1)  # columns: (channel, ...)
        return per_channel.min(1).values, per_channel.max(1).values

    ref_min, ref_max = channel_range(oracle(img.crop(box), max_pixels=64 * TOK)[0])
    assert torch.allclose(ref_min, lo, atol=1e-5) and torch.allclose(ref_max, hi, atol=1e-5)  # the oracle's range
    got_min, got_max = channel_range(crop.encode_image(img, box, max_pixels=64 * TOK)[0])
    assert (got_min >= lo - 1e-5).all(), f"below black: {got_min.tolist()} < {lo.tolist()}"
    assert (got_max <= hi + 1e-5).all(), f"above white: {got_max.tolist()} > {hi.tolist()}"


@pytest.mark.parametrize("cell,box,budget", [
    (2, (97, 68, 120, 88), 16),  # 23x20 upscaled: about 8% of values off by more than 0.1
    (3, (97, 68, 120, 88), 16),  # about 4%
    (7, (6, 3, 70, 190), 4),  # downscaled, about 3%
])
def test_encode_image_coarse_checkerboards(cell, box, budget):
    """PIL clips to 0..255 between its width and height passes; so must we, or bicubic overshoot on hard
    edges carries into the second pass (3-8% of values were off by more than 0.1 before)."""
    img = checker_image(0, 200, 200, cell=cell)
    ref_pv, ref_grid = oracle(img.crop(box), max_pixels=budget * TOK)
    pv, grid = crop.encode_image(img, box, max_pixels=budget * TOK)
    assert grid.tolist() == ref_grid.tolist()
    mean, frac = deviation(pv, ref_pv)
    assert mean <= MEAN_TOL and frac <= FRAC_TOL


# ------------------------------------------------------------------ patch order

def _coded(h, w):
    """(3, h, w) float whose value at (c, y, x) is c * 1e6 + y * 1e3 + x (exact in float32)."""
    c, y, x = torch.meshgrid(torch.arange(3), torch.arange(h), torch.arange(w), indexing="ij")
    return (c * 1_000_000 + y * 1_000 + x).float()


@pytest.mark.parametrize("h,w", [(28, 28), (56, 84), (84, 56), (28, 140)])
def test_patchify_order_by_formula(h, w):
    out = patchify(_coded(h, w))
    gh, gw = h // 14, w // 14
    assert out.shape == (gh * gw, 1176)
    for r in range(out.shape[0]):
        wy, wx = divmod(r // 4, gw // 2)  # rows: 2x2 merge windows, row-major over the window grid
        my, mx = divmod(r % 4, 2)  # then the window's 4 patches, row-major
        py, px = 2 * wy + my, 2 * wx + mx
        for j in (0, 1, 13, 14, 195, 196, 197, 391, 392, 587, 588, 1175):
            c, rest = divmod(j, 2 * 196)  # columns: (channel, time, y, x)
            _t, rest = divmod(rest, 196)
            iy, ix = divmod(rest, 14)
            expected = c * 1_000_000 + (14 * py + iy) * 1_000 + 14 * px + ix
            assert out[r, j].item() == expected, (r, j)
    # both frames of the temporal pair are the same still image
    halves = out.view(-1, 3, 2, 196)
    assert torch.equal(halves[:, :, 0], halves[:, :, 1])


@pytest.mark.parametrize("h,w", [(28, 28), (56, 84), (84, 56), (112, 28)])
def test_patchify_matches_processor_patchify(h, w):
    x = _coded(h, w)
    ref, gh, gw = hf_pil.Qwen2VLImageProcessorPil().patchify(x.numpy(), patch_size=14, merge_size=2,
                                                            temporal_patch_size=2)
    assert (gh, gw) == (h // 14, w // 14)
    assert torch.equal(patchify(x), torch.from_numpy(np.ascontiguousarray(ref)))


@pytest.mark.parametrize("w,h", [(56, 84), (84, 56), (112, 56)])
def test_encode_image_without_resampling_is_exact(w, h):
    # the size is already smart_resize's answer: no resampling on either side, so any difference is order or
    # normalisation. Pure noise, so a misplaced patch or channel cannot hide.
    img = Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    ref_pv, ref_grid = oracle(img, max_pixels=1024 * TOK)
    pv, grid = crop.encode_image(img, None, max_pixels=1024 * TOK)
    assert grid.tolist() == ref_grid.tolist() == [[1, h // 14, w // 14]]
    assert torch.allclose(pv, ref_pv, atol=1e-5, rtol=0)


def test_fit_box_grows_a_thin_box_to_the_tools_least_side_and_aspect():
    """The gt-box probe's boxes: a 1-px-high box gets 28 px; an 8000 x 5 box gets 80 px (8000 / 100), which the
    encoder takes (past 200:1 it refuses); each about its centre, inside the image."""
    assert crop.fit_box((100, 486, 400, 487), (1000, 1000)) == (100, 472, 400, 500)
    box = crop.fit_box((0, 100, 8000, 105), (8000, 6000))
    assert box == (0, 62, 8000, 142)
    crop.crop_size(box, (800, 600), (8000, 6000), 1024 * 784)  # does not raise
    assert crop.fit_box((0, 0, 5, 3), (1000, 1000)) == (0, 0, 28, 28)  # at the corner: shifted inside


def test_encode_crops_batches_like_single_calls():
    img = smooth_image(11, 300, 200)
    u8 = crop.to_uint8(img)
    boxes = [None, (0, 0, 50, 60), (120, 30, 300, 200), (7, 9, 20, 15)]
    pv, grids = crop.encode_crops(u8, boxes, max_pixels=64 * TOK)
    singles = [crop.encode_image(img, b, max_pixels=64 * TOK) for b in boxes]
    assert grids.tolist() == [g[0].tolist() for _, g in singles]
    assert torch.equal(pv, torch.cat([p for p, _ in singles]))
    # None is the whole image; a tensor input gives what the PIL input gives
    assert torch.equal(singles[0][0], crop.encode_image(u8, (0, 0, 300, 200), max_pixels=64 * TOK)[0])
    # a fractional box is the box PIL's crop would cut: rounded, not truncated
    assert torch.equal(crop.encode_image(u8, (10.6, 20.6, 66.6, 76.6), max_pixels=64 * TOK)[0],
                       crop.encode_image(u8, (11, 21, 67, 77), max_pixels=64 * TOK)[0])


# ------------------------------------------------------------------ check_box

GOOD_BOXES = [
    # (box, shown_wh, orig_wh, expected original-frame box)
    ([10, 10, 20, 20], (100, 50), (1000, 500), (100, 100, 200, 200)),  # x10 both ways
    ((10, 5, 30, 25), (100, 50), (1000, 500), (100, 50, 300, 250)),  # a tuple is fine
    ([10, 10, 30, 30], (100, 50), (200, 400), (20, 80, 60, 240)),  # x2 in x, x8 in y
    ([0, 0, 100, 50], (100, 50), (1000, 500), (0, 0, 1000, 500)),  # the whole image
    ([10.4, 10.6, 50.2, 45.7], (100, 50), (100, 50), (10, 11, 50, 46)),  # floats are rounded
    ([10, 20, 60, 70], (100, 100), (100, 100), (10, 20, 60, 70)),  # same frame: unchanged
    # clamped to the image
    ([-5, -5, 50, 60], (100, 50), (1000, 500), (0, 0, 500, 500)),
    ([90, 40, 130, 75], (100, 50), (1000, 500), (900, 400, 1000, 500)),
    ([-1e308, 0, 1e308, 50], (100, 50), (1000, 500), (0, 0, 1000, 500)),  # huge but finite; inf once mapped
    # under 28 px: grown about its centre to 28
    ([100, 100, 110, 105], (1000, 500), (1000, 500), (91, 88, 119, 116)),
    ([10, 10, 11, 11], (100, 50), (1000, 500), (91, 91, 119, 119)),  # 10x10 after mapping
    ([500, 200, 501, 400], (1000, 500), (1000, 500), (486, 200, 514, 400)),  # only x grows
    # ...shifted to stay inside at the borders
    ([0, 0, 5, 5], (1000, 500), (1000, 500), (0, 0, 28, 28)),
    ([995, 495, 1000, 500], (1000, 500), (1000, 500), (972, 472, 1000, 500)),
    ([-3, 490, 4, 520], (1000, 500), (1000, 500), (0, 472, 28, 500)),
    # ...but never beyond an image smaller than 28
    ([0, 0, 5, 5], (20, 20), (20, 20), (0, 0, 20, 20)),
    ([2, 2, 3, 3], (10, 40), (10, 40), (0, 0, 10, 28)),  # x: the whole 10; y: 28 of 40
    ([10, 10, 20, 20], (100, 50), (200, 400), (16, 80, 44, 160)),  # 20 px wide once mapped: grown
    ([10.4, 10.6, 50.2, 30.7], (100, 50), (100, 50), (10, 7, 50, 35)),  # 20.1 high: grown about 20.65
    # aspect 100 is still allowed
    ([0, 0, 2800, 28], (3000, 3000), (3000, 3000), (0, 0, 2800, 28)),
]


@pytest.mark.parametrize("box,shown,orig,expected", GOOD_BOXES)
def test_check_box_good(box, shown, orig, expected):
    got, why = crop.check_box(box, shown, orig)
    assert why is None
    assert got == expected and all(type(v) is int for v in got)
    x1, y1, x2, y2 = got
    assert 0 <= x1 < x2 <= orig[0] and 0 <= y1 < y2 <= orig[1]
    assert x2 - x1 >= min(28, orig[0]) and y2 - y1 >= min(28, orig[1])


BAD_BOXES = [
    # (box, shown_wh, orig_wh, a word the message must hold)
    ([1, 2, 3], (100, 100), (100, 100), "four"),
    ([1, 2, 3, 4, 5], (100, 100), (100, 100), "four"),
    ([], (100, 100), (100, 100), "four"),
    ("1234", (100, 100), (100, 100), "four"),  # a string of length 4 is not a box
    ({"x1": 1, "y1": 2, "x2": 3, "y2": 4}, (100, 100), (100, 100), "four"),
    (None, (100, 100), (100, 100), "four"),
    (42, (100, 100), (100, 100), "four"),
    (["1", "2", "30", "40"], (100, 100), (100, 100), "numbers"),
    ([True, 0, 10, 10], (100, 100), (100, 100), "numbers"),
    ([0, 0, False, 10], (100, 100), (100, 100), "numbers"),
    ([None, 0, 10, 10], (100, 100), (100, 100), "numbers"),
    ([[0], 0, 10, 10], (100, 100), (100, 100), "numbers"),
    ([float("nan"), 0, 10, 10], (100, 100), (100, 100), "finite"),
    ([0, 0, float("inf"), 10], (100, 100), (100, 100), "finite"),
    ([0, float("-inf"), 10, 10], (100, 100), (100, 100), "finite"),
    ([0, 0, 1e308 * 10, 10], (100, 100), (100, 100), "finite"),
    ([10 ** 400, 0, 10, 10], (100, 100), (100, 100), "large"),
    ([0, 0, 10, -10 ** 400], (100, 100), (100, 100), "large"),
    ([20, 10, 10, 20], (100, 100), (100, 100), "inverted"),  # x2 < x1
    ([10, 20, 20, 10], (100, 100), (100, 100), "inverted"),  # y2 < y1
    ([10, 10, 10, 20], (100, 100), (100, 100), "empty"),  # zero width
    ([10, 10, 20, 10], (100, 100), (100, 100), "empty"),
    ([200, 200, 300, 300], (100, 50), (1000, 500), "outside"),
    ([-50, -50, -10, -10], (100, 50), (1000, 500), "outside"),
    ([100, 0, 120, 10], (100, 50), (1000, 500), "outside"),  # starts at the right edge
    ([0, 50, 10, 60], (100, 50), (1000, 500), "outside"),  # starts at the bottom edge
    ([0, 0, 2801, 28], (3000, 3000), (3000, 3000), "elongated"),  # aspect just over 100
    ([0, 0, 5000, 10], (5000, 5000), (5000, 5000), "elongated"),  # 10 grows to 28: still 178:1
    ([0, 0, 1, 3000], (3000, 3000), (3000, 3000), "elongated"),
]


@pytest.mark.parametrize("box,shown,orig,word", BAD_BOXES)
def test_check_box_bad(box, shown, orig, word):
    got, why = crop.check_box(box, shown, orig)  # never raises
    assert got is None
    assert isinstance(why, str) and word in why


# ------------------------------------------------------------------ map_box, to_uint8

@pytest.mark.parametrize("box,src,dst,expected", [
    ((10, 20, 30, 40), (100, 200), (1000, 100), (100, 10, 300, 20)),
    ((0, 0, 100, 200), (100, 200), (7, 9), (0, 0, 7, 9)),
    ((5, 5, 6, 6), (10, 10), (10, 10), (5, 5, 6, 6)),
])
def test_map_box_values(box, src, dst, expected):
    assert crop.map_box(box, src, dst) == pytest.approx(expected)


def test_map_box_round_trip():
    rng = random.Random(3)
    for _ in range(500):
        a = (rng.randint(1, 9000), rng.randint(1, 9000))
        b = (rng.randint(1, 9000), rng.randint(1, 9000))
        box = tuple(rng.uniform(-100, 9000) for _ in range(4))
        there = crop.map_box(box, a, b)
        assert crop.map_box(there, b, a) == pytest.approx(box, rel=1e-9, abs=1e-6)


def _mode_image(mode):
    w, h = 7, 5  # not square, so a transposed result shows
    if mode == "P":
        im = Image.new("P", (w, h), 0)
        im.putpalette([0, 0, 0, 200, 10, 20, 5, 6, 7] + [0] * (256 * 3 - 9))
        im.putpixel((3, 1), 1)
        im.putpixel((6, 4), 2)
        return im
    fill = {"L": 77, "LA": (77, 9), "1": 1, "RGBA": (10, 20, 30, 0), "CMYK": (0, 0, 0, 0), "RGB": (1, 2, 3)}[mode]
    im = Image.new(mode, (w, h), fill)
    spot = {"L": 200, "LA": (200, 255), "1": 0, "RGBA": (250, 1, 2, 128), "CMYK": (255, 0, 0, 0),
            "RGB": (9, 8, 7)}[mode]
    im.putpixel((3, 1), spot)
    return im


@pytest.mark.parametrize("mode,at_0_0,at_3_1", [
    ("L", (77, 77, 77), (200, 200, 200)),
    ("LA", (77, 77, 77), (200, 200, 200)),
    ("1", (255, 255, 255), (0, 0, 0)),
    ("RGBA", (10, 20, 30), (250, 1, 2)),  # alpha is dropped, not composited
    ("P", (0, 0, 0), (200, 10, 20)),
    ("CMYK", (255, 255, 255), (0, 255, 255)),  # no ink is white; full cyan is cyan
    ("RGB", (1, 2, 3), (9, 8, 7)),
])
def test_to_uint8_modes(mode, at_0_0, at_3_1):
    im = _mode_image(mode)
    t = crop.to_uint8(im)
    assert t.dtype == torch.uint8 and t.shape == (5, 7, 3)
    assert tuple(t[0, 0].tolist()) == at_0_0
    assert tuple(t[1, 3].tolist()) == at_3_1  # (row y=1, column x=3)
    assert np.array_equal(t.numpy(), np.asarray(im.convert("RGB")))
    if mode == "P":
        assert tuple(t[4, 6].tolist()) == (5, 6, 7)


def test_to_uint8_tensors():
    t = torch.zeros(4, 5, 3, dtype=torch.uint8)
    assert crop.to_uint8(t) is t
    for bad in (torch.zeros(4, 5, 3), torch.zeros(4, 5, dtype=torch.uint8), torch.zeros(4, 5, 4, dtype=torch.uint8),
                torch.zeros(3, 4, 5, dtype=torch.uint8)[:, :, :2]):
        with pytest.raises(ValueError):
            crop.to_uint8(bad)
