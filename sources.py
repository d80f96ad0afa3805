"""Training data as published on the Hub: the row layouts of DeepEyes' 47k set and of the paper's stage-1
sources (Pixel-Reasoner, Chain-of-Focus, ThinkLite-VL), and any other table through --columns.

Each layout is a function from one row (a dict) to the fields of a sample: image (bytes, a path, or a
{bytes, path} dict), question, answer, and optionally id, options, category. It raises ValueError (or
KeyError, TypeError) on a bad row; data.py skips and counts those. data.py reads the table (parquet, or a
JSON list) and picks the layout by the table's columns:

    python train.py --data release.parquet                           # Pixel-Reasoner (images.zip unzipped beside it)
    python train.py --data ThinkLite-VL-70k.parquet,cof_sft_data.json    # sources mixed
    python train.py --data other.parquet --columns=image=img,question=q,answer=a
    python data.py convert release.parquet --out pr/train.jsonl      # the project's JSONL, images in a folder

Imports nothing of the project.
"""
import re


# DeepEyes' math rows: its reward (verl/utils/reward_score) judges them as math answers, not by string
MATH_SOURCES = ("thinklite_eureka", "xince")


def deepeyes(r):
    """DeepEyes-Datasets-47k (ChenShawn/DeepEyes-Datasets-47k, verl parquet): prompt (chat messages, the user
    text holding an <image> placeholder), images ([{bytes, path}]), reward_model.ground_truth,
    extra_info.question / .index, data_source."""
    extra = r.get("extra_info") or {}
    question = extra.get("question")
    if not question:
        users = [m["content"] for m in r.get("prompt") or [] if m.get("role") == "user"]
        question = users[-1].replace("<image>", "").strip() if users else ""
    source = r.get("data_source")
    return dict(id=extra.get("index"), image=_first(r.get("images")), question=question,
                answer=_unboxed((r.get("reward_model") or {}).get("ground_truth")), category=source,
                matcher="math" if source in MATH_SOURCES else None)


def pixelreasoner(r):
    """Pixel-Reasoner's RL data (TIGER-Lab/PixelReasoner-RL-Data, release.parquet; images in images.zip):
    qid, question, image (a list of paths into the unzipped images folder), is_video, answer (a list: its first
    is the answer, often as \\boxed{...}). Layout as read by verl-tool's
    examples/data_preprocess/pixel_reasoner/prepare_train.py (answer[0]). Video items are skipped."""
    if r.get("is_video"):
        raise ValueError("a video item (only images are used)")
    answer = r["answer"]
    answer = _first(answer, "answer") if isinstance(answer, (list, tuple)) else answer
    return dict(id=r.get("qid"), image=_first(r["image"]), question=r["question"], answer=_unboxed(answer))


def chain_of_focus(r):
    """Chain-of-Focus (xintongzhang/CoF-SFT-Data-5.4k, cof_sft_data.json or the Hub's parquet of it; images in
    images.zip): messages (system, user "<image>question" + Qwen's "Think in the mind first..." trailer,
    assistant <tool_call>, user tool reply, assistant <answer>), images (["./images/x.jpg", crop, ...]; the
    first is the question's image). Layout as read by the CoF-SFT download and parse scripts of public
    Apertus/verl ports. Only the question, the first image and the final answer are kept (stage 1 needs no
    trajectory)."""
    messages = r["messages"]
    users = [m["content"] for m in messages if m.get("role") == "user"]
    answers = [a for m in messages if m.get("role") == "assistant"
               for a in re.findall(r"<answer>(.*?)</answer>", m.get("content") or "", re.S)]
    if not users or not answers:
        raise ValueError("no user question or no <answer> in the messages")
    question = users[0].replace("<image>", "").split("Think in the mind first", 1)[0].strip()
    image = _first(r.get("images"))
    if isinstance(image, dict):
        image = image.get("image") or image
    return dict(image=image, question=question, answer=answers[-1].strip())


def thinklite(r):
    """ThinkLite-VL (russwang/ThinkLite-VL-70k and -hard-11k, parquet): image ({bytes, path}), problem ("<image>"
    + the question, options inline), answer. Layout as read by ThinkLite-VL's own MCTS selection script
    (data['image'], data['problem'].split('<image>')[1], data['answer'])."""
    return dict(id=r.get("id"), image=r["image"], question=str(r["problem"]).replace("<image>", "").strip(),
                answer=r["answer"])


# Required columns -> layout, tried in this order (the first whose columns the table has).
LAYOUTS = {
    "deepeyes": ({"prompt", "images", "reward_model"}, deepeyes),
    "pixelreasoner": ({"qid", "question", "image", "is_video", "answer"}, pixelreasoner),
    "chain-of-focus": ({"messages", "images"}, chain_of_focus),
    "thinklite": ({"problem", "image", "answer"}, thinklite),
}
FIELDS = ("image", "question", "answer", "options", "id", "category", "matcher")


def detect(columns):
    """(name, row function) of the first layout whose required columns are all present, else None."""
    return next(((name, fn) for name, (need, fn) in LAYOUTS.items() if need <= set(columns)), None)


def by_columns(spec):
    """--columns image=img,question=q,answer=a[,options=...][,id=...][,category=...] -> a row function."""
    mapping = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    unknown = set(mapping) - set(FIELDS)
    missing = {"image", "question", "answer"} - set(mapping)
    if unknown or missing or len(mapping) != len(spec.split(",")):
        raise SystemExit(f"error: --columns {spec!r}: expected field=column pairs separated by commas; fields "
                         f"{', '.join(FIELDS)}; image, question and answer required")

    def row(r):  # image, question and answer must be there; the other fields may be missing from a row
        out = {field: r[column] if field in ("image", "question", "answer") else r.get(column)
               for field, column in mapping.items()}
        out["image"] = _first(out["image"]) if isinstance(out["image"], list) else out["image"]
        return out
    return row


def _first(values, what="image"):
    if not values:
        raise ValueError(f"no {what}")
    return values[0]


def _unboxed(answer):
    """A gold answer written as \\boxed{X} (math-style sets) is X: the reply's <answer> holds X, not the box.
    Only one box around the whole answer is taken off ("\\boxed{a}, \\boxed{b}" stays as it is)."""
    text = answer.strip() if isinstance(answer, str) else ""
    if not (text.startswith("\\boxed{") and text.endswith("}")):
        return answer
    depth = 0
    for c in text[len("\\boxed"):-1]:  # the box's brace must close at the very end
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth == 0:
            return answer
    return text[len("\\boxed{"):-1].strip()
