"""Data: the synthetic high-resolution VQA set (the embedded default), the project's JSONL format, and
training tables as published on the Hub (DeepEyes, Pixel-Reasoner, Chain-of-Focus, ThinkLite-VL: sources.py).

Synthetic: 2-4K images full of clutter with one small white label holding a short word or a tiny glyph.
At the global budget the label is a few pixels wide and unreadable; a crop of the original reads it.
JSONL (one sample per line; relative image paths resolve against the file's folder):
    {"id": "a1", "image": "imgs/a.jpg", "question": "...", "options": ["...", ...], "answer": "B",
     "boxes": [[x1, y1, x2, y2], ...]}     # options and boxes optional; boxes nested, innermost first
    (optional too: "category", "global_tokens" (an information-gap level), "matcher" (exact | rule | math))

    python data.py show --data synthetic:4          # print samples
    python data.py show --data release.parquet,ThinkLite-VL-70k.parquet     # sources mixed
    python data.py convert release.parquet --out pr/train.jsonl       # any source -> JSONL + image folder
"""
import argparse
import hashlib
import io
import json
import math
import os
import random
import shutil
import stat
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont, ImageOps

import sources
from crop import MAX_IMAGE_ASPECT, BadImage  # BadImage: what Sample.image raises (data.BadImage)

MATCHERS = ("exact", "rule", "math")  # rewards.MATCHERS, which a row may name (data imports no scoring code)

WORDS = ("apple river stone cloud tiger lemon piano rocket candle forest silver window garden bridge "
         "honey violin planet marble castle dragon").split()
GLYPHS = ("circle", "square", "triangle", "cross")
LETTERS = "ABCDE"
# The seed of the held-out generated sets (eval.py's default, the in-training probe): a run that generates its
# training items with the same seed would train on them, so train.py refuses it
HELD_OUT_SEED = 1
SYNTHETIC_LEVEL = 64  # the synthetic set's designed information-gap level: at 64 tokens no label is readable (tested)
# Decompression-bomb guard: images with more pixels are refused (an 8K image is 33 MP). LFPC_MAX_PIXELS sets it.
MAX_PIXELS = int(os.environ.get("LFPC_MAX_PIXELS", 200_000_000))
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ORIENTATION = 0x0112  # the EXIF tag


def to_rgb(im):
    """Any PIL image -> RGB and upright: EXIF orientation applied (as transformers' own loader does, so boxes
    are in the upright frame); transparency laid on white (as Qwen's image processor does: transformers'
    convert_to_rgb); 16- and 32-bit images scaled to 8 bits rather than clipped."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I") or im.mode == "F":
        import numpy as np
        a = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if "16" in im.mode else max(float(a.max()), 1.0)
        im = Image.fromarray((a / peak * 255).clip(0, 255).astype(np.uint8), "L")
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im.convert("RGB")


def _open_checked(path_or_file, name):
    """(width, height) of an image file, upright (EXIF orientation applied), after cheap checks: a regular file
    (a FIFO would block forever), a header that decodes, verify(), within MAX_PIXELS, and an aspect ratio the
    image encoder accepts. Raises ValueError with the reason."""
    try:
        mode = os.stat(path_or_file).st_mode if isinstance(path_or_file, str) else stat.S_IFREG
        if stat.S_ISDIR(mode):
            raise ValueError("is a directory, not an image file")
        if not stat.S_ISREG(mode):
            raise ValueError("not a regular file (a FIFO or device)")
        with Image.open(path_or_file) as im:
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise ValueError(f"{width}x{height} is over the {MAX_PIXELS:,}-pixel limit (LFPC_MAX_PIXELS)")
            if width == 0 or height == 0:
                raise ValueError("zero-size image")
            if max(width, height) / min(width, height) > MAX_IMAGE_ASPECT:
                raise ValueError(f"{width}x{height}: aspect ratio over {MAX_IMAGE_ASPECT}:1, which the image "
                                 f"encoder refuses")
            im.verify()  # walks the file without decoding: catches truncated PNGs and bad chunks cheaply
        if hasattr(path_or_file, "seek"):
            path_or_file.seek(0)
        with Image.open(path_or_file) as im:  # verify() leaves the image unusable: open again for EXIF
            # a quarter turn: the upright frame's size, unless Pillow gives it already (it does for a TIFF: the
            # size it reports is its width and height tags swapped)
            tags = getattr(im, "tag_v2", {})
            turned = im.size == (tags.get(257), tags.get(256)) != (tags.get(256), tags.get(257))
            if im.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8) and not turned:
                width, height = height, width
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # SyntaxError: broken PNGs
        # PIL names an in-memory file by its address, which changes from run to run; a file's name is said already
        what = "" if isinstance(path_or_file, str) else "(embedded bytes)"
        raise ValueError(f"image {name}: {str(e).replace(repr(path_or_file), what).rstrip(': ')}") from None
    return width, height


@dataclass
class Sample:
    id: str
    question: str
    answer: str  # an option letter when `options` is set, else the answer text
    width: int
    height: int
    options: list = None
    boxes: list = None  # nested boxes, innermost first, original pixels
    category: str = "default"
    image_path: str = None  # where the original lives; None for synthetic samples
    make: object = field(default=None, repr=False)  # synthetic / embedded images: a function that makes the original
    global_tokens: int = None  # information-gap level (stage 1), if selected
    designed_tokens: int = None  # generated data: the level it is drawn for (its level unless one is selected)
    meta: dict = field(default_factory=dict)  # benchmark fields used in scoring (cycle, task, subtask)

    def image(self):
        """The original image, RGB. Raises BadImage (naming the file) when it cannot be decoded."""
        try:
            if self.make is not None:
                return self.make()
            with Image.open(self.image_path) as im:
                return to_rgb(im)
        except Exception as e:  # noqa: BLE001 - a corrupt file can make a decoder raise anything (TypeError, ...)
            raise BadImage(f"sample {self.id} ({self.image_path or 'embedded image'}): {type(e).__name__}: {e}",
                           self.id) from None


# ---------------------------------------------------------------- synthetic

def synthetic(n, seed=0, min_side=2048, max_side=4096):
    """n deterministic samples: the same (n, seed) always gives the same images, questions and boxes."""
    return [_synthetic_sample(i, seed, min_side, max_side) for i in range(n)]


def _synthetic_sample(i, seed, min_side, max_side):
    rng = random.Random(seed * 1_000_003 + i)
    w, h = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
    category = rng.choice(("word", "glyph"))
    choices = rng.sample(WORDS if category == "word" else GLYPHS, 4)
    answer = rng.randrange(4)
    lw, lh = (96, 30) if category == "word" else (30, 30)  # the label: small against a 2-4K image
    lx, ly = rng.randint(lw, w - 2 * lw), rng.randint(lh, h - 2 * lh)
    b1 = [lx, ly, lx + lw, ly + lh]
    boxes = [b1] + [_expand(b1, k, w, h) for k in (4, 12)]
    question = ("What word is written on the small white label?" if category == "word"
                else "Which shape is drawn on the small white label?")
    draw_seed = rng.random()

    def make():
        return _draw(w, h, b1, category, choices[answer], random.Random(draw_seed))

    return Sample(id=f"syn-{seed}-{i}", question=question, answer=LETTERS[answer], width=w, height=h,
                  options=choices, boxes=boxes, category=category, make=make, designed_tokens=SYNTHETIC_LEVEL)


def _expand(box, k, w, h):
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) * k / 2, (box[3] - box[1]) * k / 2
    return [max(0, round(cx - hw)), max(0, round(cy - hh)), min(w, round(cx + hw)), min(h, round(cy + hh))]


def _draw(w, h, label, category, target, rng):
    img = Image.new("RGB", (w, h), tuple(rng.randint(60, 200) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(250):  # clutter: shapes that blur into texture when downsampled
        x, y = rng.randint(0, w), rng.randint(0, h)
        s = rng.randint(20, max(40, w // 8))
        color = tuple(rng.randint(0, 255) for _ in range(3))
        shape = rng.choice((d.rectangle, d.ellipse, d.line))
        if shape is d.line:
            d.line([x, y, x + rng.randint(-s, s), y + rng.randint(-s, s)], fill=color, width=rng.randint(2, 9))
        else:
            shape([x, y, x + s, y + rng.randint(20, s)], fill=color)
    d.rectangle(label, fill="white", outline="black")
    x1, y1, x2, y2 = label
    if category == "word":
        d.text((x1 + 4, y1 + 6), target, fill="black", font=ImageFont.load_default(size=16))
    else:
        cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, 10
        if target == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill="black")
        elif target == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill="black")
        elif target == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill="black")
        else:
            d.line([cx - r, cy - r, cx + r, cy + r], fill="black", width=4)
            d.line([cx - r, cy + r, cx + r, cy - r], fill="black", width=4)
    return img


# ---------------------------------------------------------------- micro: the task with a real information gap

# The micro task (`micro:N`), sized for the micro model on a CPU. A 448x448 image (256 tokens at full resolution)
# holds one thick black frame (64 pixels) near its centre; inside it, a fine black-and-white pattern with a period of 4
# pixels. The frame shows at every budget (at 16 tokens it is a dark ring in one 28x28-pixel token); the pattern
# averages to one grey once the image is shrunk 4x (16 tokens), and reads from 100 tokens up (tested:
# tests/test_micro.py). The options come in one fixed order [choice], so the answer letter names the pattern.
MICRO_SIDE = 448
MICRO_CELL = 112  # 4x4 cells; at the gap level each cell is one language-model token
# The frame lies anywhere in the central 2x2 cells [choice]: a micro model trained for minutes does not learn to
# point at one of 16 cells (measured: its boxes ignored the image), so where to crop is nearly fixed, and what is
# learnt is whether to crop and how tightly (stage 2)
MICRO_REGION = (MICRO_CELL, 3 * MICRO_CELL)
MICRO_LABEL = 64  # the frame's outer side; the pattern fills the inside
MICRO_BORDER = 8
MICRO_LEVEL = 16  # the designed information-gap level (tokens): the pattern is unreadable there
MICRO_READABLE = 100  # a budget at which the pattern is readable (280x280 pixels; at 64 it is half-aliased)
# the micro task's episodes: wording, turn and token limits, crop budget. train.py's micro preset, the warm start
# and its held-out check use these; the Makefile's EVAL_SETTINGS spells them out (tests/test_house.py compares)
MICRO_EPISODE = dict(prompt="micro", max_turns=3, max_turn_tokens=48, max_response_tokens=160, crop_tokens=64)
# option text -> 0/1 value at (x, y) inside the frame; each pattern is half black, so all blur to one grey. The
# options are drawn symbols (horizontal stripes, vertical, checks, rising and falling diagonals): a few tokens each
PATTERNS = {
    "=": lambda x, y: (y // 2) % 2,  # period 4 px
    "||": lambda x, y: (x // 2) % 2,
    "#": lambda x, y: (x // 2 + y // 2) % 2,
    "//": lambda x, y: ((x + y) // 2) % 2,
    "\\\\": lambda x, y: ((x - y) // 2) % 2,
}


def micro(n, seed=0):
    """n deterministic samples of the micro task: the same (n, seed) always gives the same items."""
    return [_micro_sample(i, seed) for i in range(n)]


def _micro_sample(i, seed):
    rng = random.Random(seed * 1_000_003 + i + 7_777_777)  # never the synthetic set's stream
    options = list(PATTERNS)
    answer = rng.randrange(len(options))
    lo, hi = MICRO_REGION
    lx, ly = rng.randint(lo, hi - MICRO_LABEL), rng.randint(lo, hi - MICRO_LABEL)
    b1 = [lx, ly, lx + MICRO_LABEL, ly + MICRO_LABEL]
    boxes = [b1] + [_expand(b1, k, MICRO_SIDE, MICRO_SIDE) for k in (1.5, 2.5)]  # label, + margin, region
    draw_seed = rng.random()

    def make():
        return _draw_micro(b1, options[answer], random.Random(draw_seed))

    return Sample(id=f"micro-{seed}-{i}", question="Which pattern is in the black box?", answer=LETTERS[answer],
                  width=MICRO_SIDE, height=MICRO_SIDE, options=options, boxes=boxes, category="pattern", make=make,
                  designed_tokens=MICRO_LEVEL)


def _draw_micro(label, pattern, rng):
    import numpy as np

    img = Image.new("RGB", (MICRO_SIDE, MICRO_SIDE), tuple(rng.randint(90, 200) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(6):  # flat mid-tone blobs: something to look past, never dark enough to pass for the frame
        x, y, s = rng.randint(0, MICRO_SIDE), rng.randint(0, MICRO_SIDE), rng.randint(30, 120)
        shape = rng.choice((d.rectangle, d.ellipse))
        shape([x, y, x + s, y + rng.randint(30, s)], fill=tuple(rng.randint(90, 230) for _ in range(3)))
    x1, y1, x2, y2 = label
    d.rectangle([x1, y1, x2 - 1, y2 - 1], fill="black")
    side = MICRO_LABEL - 2 * MICRO_BORDER
    ys, xs = np.mgrid[0:side, 0:side] + np.array([rng.randrange(4), rng.randrange(4)])[:, None, None]
    # a random phase: what bleeds from the pattern into the frame's edge when shrunk is not the same for every
    # item of a pattern, so no trace of the pattern survives at the gap level
    inside = (PATTERNS[pattern](xs, ys) * 255).astype(np.uint8)
    img.paste(Image.fromarray(np.stack([inside] * 3, -1), "RGB"), (x1 + MICRO_BORDER, y1 + MICRO_BORDER))
    return img


# ---------------------------------------------------------------- JSONL

def read_jsonl(path, max_reasons=5):
    """Samples from the project's JSONL. Bad rows are skipped; their count and first reasons are printed."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: data file not found: {path}")
    root = os.path.dirname(os.path.abspath(path))
    samples, bad = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:  # UnicodeDecodeError is a ValueError: a line that is not UTF-8 is a bad row, not mangled text
                line = raw.decode("utf-8").removeprefix("\ufeff") if n == 1 else raw.decode("utf-8")
                if line.strip():
                    samples.append(_jsonl_row(json.loads(line), root, n))
            except (ValueError, TypeError, KeyError, OSError, RecursionError) as e:
                bad.append(f"{path}:{n}: {e}")
    return _report(samples, bad, path, "row", max_reasons)


def _jsonl_row(row, root, n):
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object")
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool) and math.isfinite(answer):
        answer = str(answer)  # a count: 3, as a table's cell would give it
    elif answer is not None and not isinstance(answer, str):
        raise ValueError(f"'answer' must be text or a number, not {type(answer).__name__}")
    for key, value in (("image", row.get("image")), ("question", row.get("question")), ("answer", answer)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"missing or empty {key!r}")
    path = row["image"] if os.path.isabs(row["image"]) else os.path.join(root, row["image"])
    width, height = _open_checked(path, path)
    options = row.get("options")
    answer = answer.strip()
    if options is not None:
        if not isinstance(options, list) or not 2 <= len(options) <= 5 or not all(isinstance(o, str) for o in options):
            raise ValueError("'options' must be a list of 2 to 5 strings")
        answer = answer.upper()
        if answer not in list(LETTERS[:len(options)]):
            raise ValueError(f"answer {row['answer']!r} is not an option letter")
    boxes = row.get("boxes")
    if boxes is not None:
        boxes = _check_nested(boxes, width, height)
    level = row.get("global_tokens")
    if level is not None and (type(level) is not int or level < 4):
        raise ValueError(f"'global_tokens' must be a whole number of tokens, at least 4 (not {level!r})")
    return Sample(id=str(row["id"] if row.get("id") is not None else n), question=row["question"], answer=answer,
                  width=width, height=height, options=options, boxes=boxes,  # a null id or category: none, as a table's
                  category=str(row.get("category") or "default"), image_path=path,
                  global_tokens=level, meta=_matcher_meta(row.get("matcher")))


def _check_nested(boxes, width, height):
    if not isinstance(boxes, list) or not boxes:
        raise ValueError("'boxes' must be a non-empty list of [x1, y1, x2, y2]")
    out = []
    for b in boxes:
        if (not isinstance(b, list) or len(b) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)):
            raise ValueError(f"box {b!r} is not [x1, y1, x2, y2]")
        if not (0 <= b[0] < b[2] <= width and 0 <= b[1] < b[3] <= height):
            raise ValueError(f"box {b} is empty or outside the {width}x{height} image")
        if out and not (b[0] <= out[-1][0] and b[1] <= out[-1][1] and b[2] >= out[-1][2] and b[3] >= out[-1][3]):
            raise ValueError(f"box {b} does not contain the box before it (boxes go innermost first)")
        out.append([float(v) for v in b])
    if out[-1][2] <= 1 and out[-1][3] <= 1 and width * height > 1:  # every box within the first pixel
        raise ValueError(f"boxes {boxes} look normalised to 0-1: boxes are pixels [x1, y1, x2, y2] of the image")
    return out


def unique_ids(samples, path):
    """Results, skipped images and information-gap levels are kept by item id: two items with one id (a row
    without an id gets its line number, which another row may carry) would share them."""
    dup = [i for i, n in Counter(s.id for s in samples).items() if n > 1]
    if dup:
        raise SystemExit(f"error: {path}: {len(dup)} item id(s) appear more than once: {', '.join(dup[:10])}")
    return samples


def cut_partial_line(path):
    """A JSONL whose last line was cut by a kill is truncated to its last newline, so that appending goes on
    from a whole line (the cut item is redone), never glued onto the cut one. Returns whether it cut."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
        end = f.tell()
        while end > 0:  # backwards in blocks to the last newline
            start = max(0, end - (1 << 16))
            f.seek(start)
            i = f.read(end - start).rfind(b"\n")
            if i >= 0:
                f.truncate(start + i + 1)
                return True
            end = start
        f.truncate(0)
    return True


# ---------------------------------------------------------------- tables as published on the Hub

def _image_from_bytes(raw):
    def make():
        with Image.open(io.BytesIO(raw)) as im:
            return to_rgb(im)
    make.raw = raw  # convert writes the original bytes, not a re-encoding
    return make


class Loaded(list):
    """The samples read from a file, and `skipped`: one line per row or item left out, saying which and why
    (eval.py counts them in the benchmark's size and keeps them in skipped.txt)."""
    skipped = ()


def _report(samples, bad, path, what="item", max_reasons=5):
    """Print how many rows or items were skipped and the first reasons; stop if nothing usable is left.
    Returns the samples as a Loaded list that keeps every reason."""
    if bad:
        print(f"skipped {len(bad)} bad {what}(s) of {path}:")
        for reason in bad[:max_reasons]:
            print("  " + reason)
        if len(bad) > max_reasons:
            print(f"  ... and {len(bad) - max_reasons} more")
    if not samples:
        raise SystemExit(f"error: no usable sample in {path}")
    loaded = Loaded(samples)
    loaded.skipped = list(bad)
    return loaded


def read_table(path, columns=None):
    """Samples from a table as published on the Hub: a parquet (or a JSON list of rows) in one of the layouts
    of sources.py (DeepEyes, Pixel-Reasoner, Chain-of-Focus, ThinkLite-VL), picked by its columns, or any
    table with `columns` naming them ("image=img,question=q,answer=a"). A single-letter answer with no
    options is scored as a letter, anything else as a short answer. Bad rows are skipped and counted."""
    rows = _read_rows(path)
    names = sorted({k for r in rows[:100] if isinstance(r, dict) for k in r})
    layout = ("--columns", sources.by_columns(columns)) if columns else sources.detect(names)
    if layout is None:
        raise SystemExit(f"error: no usable sample in {path}: its columns ({', '.join(names) or 'none'}) match no "
                         f"known layout ({', '.join(sources.LAYOUTS)}); name them with --columns "
                         f"image=COL,question=COL,answer=COL")
    root = os.path.dirname(os.path.abspath(path))
    samples, bad = [], []
    for n, r in enumerate(rows):
        try:
            samples.append(_table_sample(layout[1](r), root, n))
        except (KeyError, ValueError, TypeError, AttributeError, OSError, SyntaxError) as e:
            bad.append(f"{path}: row {n}: {type(e).__name__}: {e}")
    print(f"{path}: {layout[0]} layout, {len(samples)} sample(s)")
    return _report(samples, bad, path, "row")


def _read_rows(path):
    if not os.path.isfile(path):
        raise SystemExit(f"error: data file not found: {path}")
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
            if not isinstance(rows, list):
                raise ValueError("a .json data file must hold a list of rows")
            return rows
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise SystemExit(f"error: cannot read {path} as {'JSON' if path.endswith('.json') else 'parquet'}: {e}") from None


def cell_text(value):
    """A table cell as text: "" when missing (None, or NaN as pandas writes it), else str (an integer 0 too)."""
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def _table_sample(f, root, n):
    """A layout's fields -> a Sample: the image checked (embedded bytes, or a path relative to the table's
    folder or to images/ beside it, where the Hub's images.zip unpacks), question and answer non-empty."""
    question, answer = (cell_text(f.get(k)).strip() for k in ("question", "answer"))
    if not question or not answer:
        raise ValueError("no question" if not question else "no answer")
    image = f.get("image")
    if isinstance(image, dict):  # the Hub's Image feature: {bytes, path}
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        make, image_path = _image_from_bytes(bytes(image)), None
        width, height = _open_checked(io.BytesIO(image), "(embedded)")
    elif isinstance(image, str) and image:
        image = image.removeprefix("./")
        candidates = [os.path.join(root, image), os.path.join(root, "images", image)]
        image_path, make = next((c for c in candidates if os.path.isfile(c)), candidates[0]), None
        width, height = _open_checked(image_path, image_path)
    else:
        raise ValueError("no image")
    options = f.get("options")
    if options is not None:
        if not isinstance(options, (list, tuple)):
            raise ValueError(f"options must be a list, not {type(options).__name__}")
        options = [str(o) for o in options]
        answer = answer.upper()
        if not 2 <= len(options) <= 5 or answer not in list(LETTERS[:len(options)]):
            raise ValueError(f"answer {answer!r} is not a letter of the {len(options)} options")
    return Sample(id=str(f["id"] if f.get("id") is not None else n), question=question, answer=answer, width=width,
                  height=height, options=options, image_path=image_path, make=make,
                  category=str(f.get("category") or "default"), meta=_matcher_meta(f.get("matcher")))


def _matcher_meta(matcher):
    """A row's own short-answer matcher (rewards.MATCHERS), kept in its meta; {} when it has none."""
    if not matcher:  # None, or a table's empty cell
        return {}
    if matcher not in MATCHERS:
        raise ValueError(f"matcher {matcher!r}: expected one of {', '.join(MATCHERS)}")
    return dict(matcher=matcher)


# what --data and --columns take (train.py, eval.py, infogap.py, data.py); see load() and sources.py
SPECS = "synthetic[:N], micro[:N], a .jsonl, a .parquet/.json table, a folder, or several joined by commas"
COLUMNS = "a table's columns: image=COL,question=COL,answer=COL[,...]"

# the data made here from a seed (`KIND[:N]`): kind -> generator(n, seed)
GENERATED = {"synthetic": synthetic, "micro": micro}


def generated(spec):
    """Whether a data spec (or any part of a mixed one) is made here from a seed: synthetic:N or micro:N."""
    return any(p.split(":")[0] in GENERATED for p in spec.split(","))


def load(spec, seed=0, columns=None):
    """A data spec -> samples: `synthetic[:N]` or `micro[:N]` (seeded), a project JSONL, a table from the Hub (.parquet or
    .json; see sources.py), a folder of images with one JSONL beside them, or several of those separated by
    commas (mixed; each id is prefixed by its source's file name)."""
    if "," in spec:
        parts = [p for p in spec.split(",") if p]
        mixed = []
        for part in parts:
            tag = os.path.splitext(os.path.basename(os.path.normpath(part)))[0]
            for s in load(part, seed, columns):
                s.id = f"{tag}/{s.id}"
                mixed.append(s)
        if len({s.id for s in mixed}) < len(mixed):
            raise SystemExit(f"error: --data {spec!r}: two sources share a file name; rename one")
        return mixed
    return unique_ids(_load_one(spec, seed, columns), spec)


def rows_file(spec):
    """The file that holds a source's rows: a folder's one JSONL, else the spec itself."""
    if not os.path.isdir(spec):
        return spec
    found = sorted(f for f in os.listdir(spec) if f.endswith(".jsonl"))
    if len(found) != 1:
        raise SystemExit(f"error: {spec} holds {len(found)} .jsonl files; expected exactly one")
    return os.path.join(spec, found[0])


def _load_one(spec, seed, columns):
    kind, _, n = spec.partition(":")
    if kind in GENERATED:
        n = n or "256"
        if not n.isdigit() or int(n) < 1:
            raise SystemExit(f"error: bad data spec {spec!r}: expected {kind}:N with N a positive number")
        return GENERATED[kind](int(n), seed)
    if spec.endswith(".jsonl"):
        return read_jsonl(spec)
    if spec.endswith((".parquet", ".json")):
        return read_table(spec, columns)
    if os.path.isdir(spec):  # a folder of images with one JSONL beside them
        return read_jsonl(rows_file(spec))
    if not os.path.exists(spec):
        raise SystemExit(f"error: data not found: {spec} (expected {SPECS})")
    raise SystemExit(f"error: unsupported data {spec!r}: expected {SPECS}")


def fingerprint(path):
    """What a file or folder holds, as "sha256:...": a file's bytes (a table, an adapter's weights); a folder's
    (V*) file names and sizes and the contents of its files under 1 MB (the questions and answers: an edited one
    changes it even at the same size; the images by size, for speed). A spec that is not a path (synthetic:N),
    or a path not there, as is."""
    if not path or not os.path.exists(path):
        return path
    digest = hashlib.sha256()
    if os.path.isdir(path):
        for folder, _, names in sorted(os.walk(path)):
            for n in sorted(names):
                file = os.path.join(folder, n)
                size = os.path.getsize(file)
                digest.update(f"{os.path.relpath(file, path)}:{size}\n".encode())
                if size < 1 << 20:
                    _hash_file(file, digest)
    else:
        _hash_file(path, digest)
    return "sha256:" + digest.hexdigest()


def adapter_fingerprint(adapter):
    """A LoRA adapter folder by its weights (None for none): a retrained adapter at the same path is another."""
    return adapter and fingerprint(os.path.join(adapter, "adapter_model.safetensors"))


def _hash_file(path, digest):
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)


def convert(spec, out, columns=None, seed=0):
    """Write any readable source as the project's JSONL, its images in a folder beside it (<out>_images/):
    embedded images keep their bytes, files are copied, synthetic ones are drawn to PNG. A new set only: over an
    existing one, a source could be reading the images being written (a set with a source added, a folder
    converted into the image folder of its --out). Written beside and renamed: a killed conversion leaves no JSONL
    pointing at missing images."""
    folder = os.path.splitext(out)[0] + "_images"
    for path in (out, folder):
        if os.path.lexists(path):
            raise SystemExit(f"error: {path} exists already: a conversion writes a new set (pass another --out), "
                             f"never over one, which may be its own source")
    here = os.path.dirname(os.path.abspath(out))
    inside = [p for p in spec.split(",") if os.path.isdir(p) and os.path.samefile(p, here)]
    if inside:  # a folder source holds one JSONL: a second one beside it would end it as a source
        raise SystemExit(f"error: --out {out} is inside the source folder {inside[0]}: pass another --out")
    samples = load(spec, seed, columns)
    shutil.rmtree(folder + ".tmp", ignore_errors=True)  # a killed conversion's
    os.makedirs(folder + ".tmp")
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        for n, s in enumerate(samples):
            name = os.path.join(folder, os.path.basename(_write_image(s, os.path.join(folder + ".tmp", f"{n:06d}"))))
            row = dict(id=s.id, image=os.path.relpath(name, here),
                       question=s.question, answer=s.answer, options=s.options, boxes=s.boxes,
                       category=s.category, global_tokens=s.global_tokens, matcher=s.meta.get("matcher"))
            f.write(json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False) + "\n")
    os.replace(folder + ".tmp", folder)
    os.replace(out + ".tmp", out)
    print(f"wrote {len(samples)} sample(s) to {out}, images in {folder}/")
    return out


def _write_image(s, stem):
    """The sample's image at stem + its extension; returns the path."""
    raw = getattr(s.make, "raw", None)
    if s.image_path:
        path = stem + os.path.splitext(s.image_path)[1].lower()
        shutil.copyfile(s.image_path, path)
    elif raw is not None:
        with Image.open(io.BytesIO(raw)) as im:
            path = stem + "." + (im.format or "png").lower().replace("jpeg", "jpg")
        with open(path, "wb") as f:
            f.write(raw)
    else:
        path = stem + ".png"
        s.image().save(path)
    return path


def main():
    ap = argparse.ArgumentParser(description="Print the first samples of a data set, or convert it to JSONL.")
    ap.add_argument("command", choices=["show", "convert"],
                    help="show: print the first samples; convert: write a source as the project's JSONL with "
                         "its images in a folder")
    ap.add_argument("src", nargs="?", default=None, help="convert: the source (same forms as --data)")
    ap.add_argument("--data", default="synthetic:4", help=SPECS)
    ap.add_argument("--columns", default=None, help=COLUMNS)
    ap.add_argument("--limit", type=int, default=4, help="show: how many samples to print")
    ap.add_argument("--out", default=None, help="convert: the JSONL to write (its images go in a folder beside it: x.jsonl -> x_images/)")
    args = ap.parse_args()
    if args.command == "convert":
        if not args.out:
            ap.error("convert needs --out FILE.jsonl")
        convert(args.src or args.data, args.out, args.columns)
        return
    for s in load(args.data, columns=args.columns)[:args.limit]:
        options = "".join(f"\n  {LETTERS[i]}. {o}" for i, o in enumerate(s.options or []))
        print(f"{s.id} [{s.category}] {s.width}x{s.height} answer={s.answer} boxes={s.boxes}\n  {s.question}{options}")


if __name__ == "__main__":
    main()
