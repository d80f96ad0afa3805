"""The multi-turn tool loop: prompts -> Episodes, batched, with one KV cache kept across turns.

Each row (one prompt x one group sample) holds its own token list and a queue of `pending` tokens not yet
run through the model. Usually a row's queue is the one token it just sampled, and one decode step feeds every
such row at once; on a GPU that step replays a CUDA graph on a static cache (decode.py). After a tool call the
queue is that token plus the whole tool turn (the crop's image pads): a chunk. Chunks run apart from the
decoding rows (`_chunk_step`: padded together, every decoding row would pay for the chunk's length), and a
chunk waits up to `tool_wait` steps for other rows' turns, so that one forward runs several (on a GPU a forward
costs about the same for one row as for many). A waiting row sits out the decode steps: it samples nothing,
and as its draws come from a counter (below), its tokens are those it would have written without waiting.
Rows of different lengths and states share one batch and one cache, right-padded: a pad has attention mask 0
and is never attended to. Positions are Qwen's 3-D rotary positions, computed per row (model.rope_positions)
because pads would throw off HF's own. Finished rows are dropped from the batch and the cache, and waiting
prompts take their place (continuous batching): a new group is prefilled on its own and its cache joined to
the live one, so the batch stays full until the call's last rows finish. After a chunk, a join or a finished
row the padding columns are squeezed out of the cache (`_compact`), so it stays about as wide as its longest
row.

Sampling runs on the policy's device, batched over rows: temperature, top-p and the draw (inverse CDF with
one uniform per row and step from a counter-based hash of (seed, step, prompt, sample, draw), so a row's
draws depend on nothing else: not on the batch, the device or the other rows; its tokens neither, as far as
the model's numbers do not: on a GPU, a 4-bit or bf16 matmul may differ in its last bits with the batch's
rows, and a draw at a probability boundary with them). The chosen ids and their log-probs come back to the
host in one small copy per step.

Tool protocol (DeepEyes): `<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [x1, y1, x2,
y2]}}</tool_call>` in the frame of the shown global image; the reply is a user turn `<tool_response>` + the
crop (cut from the original) + `</tool_response>`, or `Error: ...` text for a bad call.
"""
import json
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

import crop
import decode
import model
from rewards import tag_contents


# the crop dependency's probe: every returned crop replaced by noise [choice, made before any result]. Added noise
# (the paper's probe, sigma = 64 levels) leaves the micro task's black-and-white pattern readable, so it measures
# robustness, not use. logbook's held-out probe and report's experiment table use it.
DEPENDENCY_PROBE = "noise-replace"


@dataclass
class RolloutConfig:
    group_size: int = 1  # samples per prompt (GRPO group); rows = prompts x group_size
    rollout_rows: int = 64  # rows in flight; waiting prompts take the places of finished rows
    max_turns: int = 5  # assistant turns per episode
    max_crops: int = 6  # successful crops per episode; later calls get an error reply
    max_turn_tokens: int = 512  # tokens the model may write in one turn
    max_response_tokens: int = 2048  # everything after the prompt: written tokens and tool turns (0: no cap)
    temperature: float = 1.0  # sampling temperature (log-probs are taken at the same temperature)
    top_p: float = 1.0  # nucleus sampling
    greedy: bool = False  # argmax decoding (evaluation)
    global_tokens: int = 1024  # budget of the global image, in language-model tokens
    crop_tokens: int = 16384  # budget of each returned crop (DeepEyes: 16,384); never coarser than the global image
    prompt: str = "deepeyes"  # the wording of the system prompt, the user turn and the tool's reply (model.PROMPTS)
    probe: str = None  # None | "noise" (noise added to the crop) | "noise-replace" (crop -> noise) | "gt-box" | "no-tool"
    noise_sigma: float = 64.0  # the noise probe's standard deviation, in 0..255 pixel levels [choice]
    seed: int = 0  # sampling seeds derive from (seed, step, prompt, sample)
    reuse_cache: bool = True  # False: the baseline that re-runs the whole conversation after each tool call
    decode: str = "auto"  # decode steps: dynamic (HF's growing cache) | static (decode.py, eager) | graphs (static +
    # CUDA graphs) | auto (graphs on CUDA, else dynamic)
    tool_wait: int = 8  # steps a tool turn may wait for other rows' turns, to run with them in one forward [choice]
    crop_from_shown: bool = False  # crops cut from the shown global image, not the original (no information gap)


@dataclass
class Episode:
    sample: object  # the data.Sample
    group: int  # index of the prompt in the rollout call (rows of one group share it)
    ids: list  # prompt + response token ids, never re-tokenised
    loss_mask: list  # 1 where the policy sampled the token, 0 for prompt, tool turns and padding
    logps: list  # log-prob of each token when sampled (0 where loss_mask is 0)
    pixel_values: list  # per image in order (global image first, then crops): float32 (N_i, 1176)
    grids: list  # per image: (t, h, w) patch grid
    prompt_len: int
    boxes_shown: list = field(default_factory=list)  # each successful crop's box as the model wrote it
    boxes: list = field(default_factory=list)  # the same boxes as cut, in the original's pixels (crop_from_shown:
    # cut from the shown image, mapped back)
    text: str = ""  # the response as text, image pads removed
    turns: int = 0
    num_tool_calls: int = 0  # successful crops
    num_tool_errors: int = 0
    tool_errors: Counter = field(default_factory=Counter)  # errors by kind
    finished: bool = False  # ended by the model: an answer, or a turn without a tool call (<|im_end|>, <|endoftext|>)
    truncated: bool = False  # stopped by a token or turn limit

    @property
    def num_generated(self):
        """Tokens the policy wrote (the ones the loss sees)."""
        return sum(self.loss_mask)


def parse_tool_call(turn_text):
    """One assistant turn -> (None, None) when it calls no tool, (bbox, None) for a well-formed call, or
    (None, (kind, message)) for a bad one. Model output is parsed as JSON data only; never raises."""
    calls = tag_contents(turn_text, "<tool_call>", "</tool_call>")
    if not calls:
        if "<tool_call>" in turn_text:
            return None, ("unclosed", "<tool_call> was not closed with </tool_call>")
        return None, None
    if len(calls) > 1:
        return None, ("multiple", "one tool call per turn, please")
    try:
        call = json.loads(calls[0])
    except (ValueError, RecursionError) as e:
        return None, ("json", f"the tool call is not valid JSON ({type(e).__name__})")
    if not isinstance(call, dict):
        return None, ("json", "the tool call must be a JSON object with 'name' and 'arguments'")
    if call.get("name") != "image_zoom_in_tool":
        return None, ("name", f"unknown tool {str(call.get('name'))[:40]!r}; the tool is image_zoom_in_tool")
    args = call.get("arguments")
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            pass
    if not isinstance(args, dict) or "bbox_2d" not in args:
        return None, ("args", "arguments must hold bbox_2d = [x1, y1, x2, y2]")
    return args["bbox_2d"], None


@dataclass
class _Row:
    ep: Episode
    orig: torch.Tensor  # uint8 (H, W, 3): the image crops are cut from, the original (or the shown image, with
    # crop_from_shown)
    shown_wh: tuple  # size of the global image the model sees
    key: int  # 32-bit sampling key from (seed, step, prompt, sample)
    pending: list  # token ids not yet run through the model
    pending_images: list  # (pixel_values, grid) of images among `pending`
    next_pos: int = 0  # the rotary position counter after the tokens already in the cache
    crop_request: tuple = None  # (source, box, grid) of a crop to encode before the next forward
    turn_start: int = 0  # index in ep.ids where the current assistant turn begins
    waited: int = 0  # steps its pending tool turn has waited for company
    done: bool = False  # the episode has ended (its group may still be in flight)
    orig_wh: tuple = None  # the original's (width, height), the frame of the sample's boxes and of ep.boxes, when
    # crops are cut from another image (crop_from_shown)

    @property
    def source_wh(self):
        """(width, height) of the image crops are cut from."""
        return self.orig.shape[1], self.orig.shape[0]


@dataclass
class _Batch:
    """The rows in flight and what the model holds for them, row b of every tensor being live[b]."""
    live: list  # _Row
    h: torch.Tensor  # (B, D) hidden state after each row's last fed token
    cache: object  # the KV cache (DynamicCache), batch dimension = rows
    mask_hist: torch.Tensor  # (B, cache length) on the device; 1 = a real token, 0 = padding
    keys: torch.Tensor  # (B,) int64 on the device: each row's sampling key
    draws: torch.Tensor  # (B,) int64 on the device: tokens drawn so far by each row (the hash counter)
    banned: torch.Tensor  # the ids the policy never writes, on the device (no copy per step)


def rollout(policy, samples, cfg, *, step=0, force=None, first=0):
    """Roll out every sample group_size times. Returns Episodes, group-major (prompt 0's samples first).

    first: the index of samples[0] among the step's prompts (sampling seeds derive from it, so a step rolled
    out in parts draws what it would in one call). force: for tests and demos, a function (episode) -> token id
    or None that replaces sampling for a row (teacher forcing: the recorded log-probs are still the model's)."""
    groups = sorted(rollout_groups(policy, samples, cfg, step=step, force=force, first=first),
                    key=lambda g: g[0].group)
    return [e for g in groups for e in g]


def rollout_skipping_bad_images(policy, samples, cfg, bad):
    """rollout() of the samples whose image decodes: one that fails is reported in one line, left out and kept in
    `bad` (id -> reason), and the others rolled out again (evaluation and the info-gap selection)."""
    while samples:
        try:
            return rollout(policy, samples, cfg)
        except crop.BadImage as e:
            print(f"skipping a bad image: {e}")
            bad[e.sample_id] = str(e)
            samples = [s for s in samples if s.id != e.sample_id]
    return []


def rollout_groups(policy, samples, cfg, *, step=0, force=None, first=0):
    """rollout() as a stream: yields each group's episodes (a list of group_size) as soon as its last row
    finishes, while the other rows go on. Training takes a group's gradient at once and frees its images, so
    a step of any size streams through rollout_rows rows. Gradients may be taken between yields: the loop
    turns autograd off only around its own work."""
    G = cfg.group_size
    waiting = list(enumerate(samples, first))  # (prompt index, sample), admitted a group at a time
    left = {}  # prompt index -> rows of its group still in flight
    batch, static = None, _static_decode(policy, cfg)
    while True:
        with torch.no_grad():
            # 1. admit waiting groups while their rows fit (at least one group when nothing is in flight)
            room = (cfg.rollout_rows - (len(batch.live) if batch else 0)) // G
            if waiting and (room > 0 or batch is None):
                _to_dynamic(static, batch)
                admitted, waiting = waiting[:max(room, 1)], waiting[max(room, 1):]
                new = _prefill(policy, [r for p, s in admitted for r in _new_rows(policy, p, s, cfg, step)], G)
                left.update({p: new.live[k * G:(k + 1) * G] for k, (p, _) in enumerate(admitted)})
                batch = _compact(new if batch is None else _join(batch, new))
            if batch is None:
                return
            # 2. sample one token per row that was fed (a row whose tool turn waits has nothing new to sample from),
            # then act on it: continue, answer the tool call, or stop
            ready = [b for b, r in enumerate(batch.live) if not r.pending]
            toks, logps = _draw(policy, batch, ready, cfg, force)
            done = set()
            for b, tok, lp in zip(ready, toks, logps):
                row = batch.live[b]
                row.ep.ids.append(tok)
                row.ep.loss_mask.append(1)
                row.ep.logps.append(lp)
                row.pending = [tok]
                if not _advance(policy, row, tok, cfg):
                    done.add(b)
            _encode_requests(batch.live, cfg)
            finished = _finished_groups(policy, [batch.live[b] for b in sorted(done)], left)
            if len(done) == len(batch.live):
                batch = None
                if static:
                    static.live = 0
            else:
                if done:  # drop finished rows from the batch and the cache
                    _to_dynamic(static, batch)
                    batch = _compact(_select(batch, [b for b in range(len(batch.live)) if b not in done]))
                if not cfg.reuse_cache and any(len(r.pending) > 1 for r in batch.live):
                    # the baseline engine (the `generate`-per-turn way): after a tool call, forget the cache and
                    # run every live row's whole conversation, images included, through the model again
                    batch.cache = _new_cache(policy)
                    batch.mask_hist = batch.mask_hist[:, :0]
                    for r in batch.live:
                        r.pending, r.next_pos = list(r.ep.ids), 0
                        r.pending_images = [(pv, torch.tensor([g])) for pv, g in zip(r.ep.pixel_values, r.ep.grids)]
                # 3. feed the pending tokens: one decode step for the rows with one token (a CUDA graph's replay
                # when the static path is on), and the tool turns that have waited long enough, together, apart
                chunk = [b for b, r in enumerate(batch.live) if len(r.pending) > 1]
                turns = [batch.live[b] for b in chunk]
                if len(chunk) < len(batch.live):
                    _decode_step(policy, batch, static)
                if turns and (len(turns) == len(batch.live) or max(r.waited for r in turns) >= cfg.tool_wait):
                    _to_dynamic(static, batch)
                    batch = _chunk_step(policy, batch, chunk)
                for r in turns:  # run (its queue fed) or one step more waiting
                    r.waited = 0 if not r.pending else r.waited + 1
        yield from finished  # outside no_grad: the consumer may take gradients here


def _static_decode(policy, cfg):
    """The static decode path of this call (decode.py), or None for HF's dynamic cache throughout."""
    mode = cfg.decode
    if mode == "auto":
        mode = "graphs" if policy.device.type == "cuda" else "dynamic"
    if mode == "dynamic" or not cfg.reuse_cache:  # the re-run baseline rebuilds its cache: nothing to keep static
        return None
    return decode.StaticDecode(policy, graphs=mode == "graphs", max_rows=max(cfg.rollout_rows, cfg.group_size))


def _to_dynamic(static, batch):
    """Before anything that changes the batch's shape: the rows back from the static cache, if they are there."""
    if static and static.live:
        static.unload(batch)


def _finished_groups(policy, done_rows, left):
    """The groups whose last rows are among done_rows, each as its episodes in sample order."""
    finished = []
    for row in done_rows:
        rows = left[row.ep.group]
        if all(r is row or r.done for r in rows):
            for r in rows:
                _finish_text(policy, r.ep)
            finished.append([r.ep for r in rows])
            del left[row.ep.group]
        row.done = True
    return finished


def _new_rows(policy, p, sample, cfg, step):
    """The group_size rows of prompt p: the global image encoded once, shared by the group."""
    budget = sample.global_tokens or cfg.global_tokens  # the sample's info-gap level is its global image
    image, orig_wh = sample.image(), None
    if cfg.crop_from_shown:  # the paper's same-resolution baseline: the crop holds nothing new
        image, orig_wh = crop.resized(image, crop.tokens_to_pixels(budget)), image.size
    orig = crop.to_uint8(image).to(policy.device)  # crops are cut and resampled where the model runs (kernels/)
    pv, grid = crop.encode_image(orig, max_pixels=crop.tokens_to_pixels(budget))
    shown_wh = (int(grid[0, 2]) * 14, int(grid[0, 1]) * 14)
    pv_host = pv.cpu()
    tools = cfg.probe != "no-tool"
    text = model.user_text(sample.question, sample.options, cfg.prompt, tools)
    ids = policy.prompt_ids(text, grid[0], tools=tools, prompt=cfg.prompt)
    rows = []
    for k in range(cfg.group_size):
        ep = Episode(sample=sample, group=p, ids=list(ids), loss_mask=[0] * len(ids), logps=[0.0] * len(ids),
                     pixel_values=[pv_host], grids=[grid[0].tolist()], prompt_len=len(ids))
        key = _hash32(((cfg.seed * 1_000_003 + step) * 100_003 + p * 1_009 + k) & _M32)
        rows.append(_Row(ep, orig, shown_wh, key, pending=list(ids), pending_images=[(pv, grid)],
                         turn_start=len(ids), orig_wh=orig_wh))
    return rows


def _prefill(policy, rows, G):
    """The rows of a group share their prompt, so it goes through the model (and its image through the
    vision tower) once per group, and the cache is then repeated for the group's rows."""
    heads = rows[::G]
    dev = policy.device
    h, cache, mask_hist = _forward(policy, heads, _new_cache(policy), torch.zeros(len(heads), 0, dtype=torch.long,
                                                                                  device=dev))
    cache.batch_repeat_interleave(G)
    for i, row in enumerate(rows):
        row.next_pos, row.pending, row.pending_images = heads[i // G].next_pos, [], []
    keys = torch.tensor([r.key for r in rows], dtype=torch.long, device=dev)
    return _Batch(rows, h.repeat_interleave(G, 0), cache, mask_hist.repeat_interleave(G, 0), keys,
                  torch.zeros_like(keys), torch.tensor(policy.banned, dtype=torch.long, device=dev))


def _select(batch, keep):
    """The batch restricted to rows `keep` (indices), in the cache too."""
    idx = torch.tensor(keep, dtype=torch.long, device=batch.keys.device)
    batch.cache.batch_select_indices(idx)
    return _Batch([batch.live[i] for i in keep], batch.h[idx], batch.cache, batch.mask_hist[idx], batch.keys[idx],
                  batch.draws[idx], batch.banned)


def _decode_step(policy, batch, static):
    """One token through the model for each row that has one pending; the other rows (tool turns waiting) are
    masked stand-ins: a pad column they never attend to, and their own state left alone. On the static cache
    (decode.py) when it is on and the shapes allow, else a forward on the dynamic cache."""
    rows = [r if len(r.pending) == 1 else SimpleNamespace(pending=[], pending_images=[], next_pos=r.next_pos)
            for r in batch.live]
    if static and decode.why_eager(rows, policy.device, static.graphs) is None:
        if not static.fits(len(rows)):
            _to_dynamic(static, batch)
            static.load(batch)
        batch.h = static.step(rows)
    else:
        _to_dynamic(static, batch)
        batch.h, batch.cache, batch.mask_hist = _forward(policy, rows, batch.cache, batch.mask_hist)


def _chunk_step(policy, batch, chunk):
    """The rows `chunk` (indices) bring chunks (tool turns: text and the crop's image pads; or, re-run baseline,
    whole conversations): one forward of theirs, on a copy of their part of the cache, and their columns then
    written into the full cache. Padded together with the decoding rows, each of those would pay for the chunk's
    length (64 rows and a 280-token turn: 17,920 positions for some 340 real tokens); so would a turn run the
    step it is written, which is why turns wait for each other (RolloutConfig.tool_wait)."""
    rows = batch.live
    if len(chunk) == len(rows):
        batch.h, batch.cache, batch.mask_hist = _forward(policy, rows, batch.cache, batch.mask_hist)
        return _compact(batch)
    idx = torch.tensor(chunk, dtype=torch.long, device=batch.keys.device)
    part = _new_cache(policy)
    for n, layer in enumerate(batch.cache.layers):
        part.update(layer.keys[idx], layer.values[idx], n)
    h_part, part, mask_part = _forward(policy, [rows[b] for b in chunk], part, batch.mask_hist[idx])
    n = mask_part.shape[1]
    for full, ours in zip(batch.cache.layers, part.layers):
        full.keys = _pad_to(full.keys, 2, n).index_copy_(0, idx, ours.keys)
        full.values = _pad_to(full.values, 2, n).index_copy_(0, idx, ours.values)
    batch.h = batch.h.index_copy(0, idx, h_part)
    batch.mask_hist = _pad_to(batch.mask_hist, 1, n).index_copy_(0, idx, mask_part)
    return _compact(batch)


def _compact(batch):
    """Squeeze the padding columns out of the cache. A chunk (a prefill, a tool turn) adds its length in columns
    to every row, padding for the rows that did not have it, and a finished row leaves its columns to the
    others: turns at different steps would grow the cache, and every step's attention, far past the rows' real
    lengths (and past --dry-run's estimate). Each row's real columns move to the front, in order; as in _join,
    a key holds its rotary position already and attention goes by the mask, so where a column sits does not
    matter. One read of the width on the host, after a chunk, a join or a finished row only."""
    mask = batch.mask_hist
    width = int(mask.sum(1).max()) if mask.numel() else 0
    if width == mask.shape[1]:
        return batch
    order = torch.sort(1 - mask, dim=1, stable=True).indices[:, :width]  # (B, width): real columns first
    for layer in batch.cache.layers:
        idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
        layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
    batch.mask_hist = mask.gather(1, order)
    return batch


def _join(a, b):
    """Rows of b appended to those of a. The shorter cache is right-padded with masked columns: every key holds
    its rotary position already and attention goes by the mask, so where a column sits does not matter."""
    n = max(a.mask_hist.shape[1], b.mask_hist.shape[1])

    def cat(x, y, dim):  # both padded to n columns, then stacked along the batch
        return torch.cat([_pad_to(x, dim, n), _pad_to(y, dim, n)], 0)

    for x, y in zip(a.cache.layers, b.cache.layers):
        x.keys, x.values = cat(x.keys, y.keys, 2), cat(x.values, y.values, 2)  # (B, heads, L, head_dim)
    return _Batch(a.live + b.live, torch.cat([a.h, b.h]), a.cache, cat(a.mask_hist, b.mask_hist, 1),
                  torch.cat([a.keys, b.keys]), torch.cat([a.draws, b.draws]), a.banned)


def _pad_to(t, dim, n):
    """t right-padded with zeros along dim to length n (masked cache columns)."""
    return torch.cat([t, t.new_zeros(t.shape[:dim] + (n - t.shape[dim],) + t.shape[dim + 1:])], dim)


def _forward(policy, rows, cache, mask_hist):
    """Run each row's pending tokens through the model. Returns the hidden state after each row's last real
    token (B, D), the cache and the attention-mask history (B, cache length; 1 = real token)."""
    ids, attn, pos, pvs, grids, last = _chunk(policy, rows)
    for r in rows:  # fed: the row samples next (rollout() tells fed rows by their empty queue)
        r.pending, r.pending_images = [], []
    dev = policy.device
    mask_hist = torch.cat([mask_hist, attn.to(dev)], 1)
    hidden, cache = policy.forward_hidden(ids.to(dev), mask_hist, pos.to(dev), pvs, grids, cache)
    return hidden[torch.arange(len(rows), device=dev), torch.tensor(last, device=dev)], cache, mask_hist


def _new_cache(policy):
    from transformers import DynamicCache
    return DynamicCache(config=policy.lm.config.text_config)


def _chunk(policy, live):
    """Stack the live rows' pending tokens: ids and attention mask (B, L), positions (3, B, L), the images in
    row order, and the index of each row's last real token."""
    ids, attn, pos, ends = model.pack_rows(
        policy, [(r.pending, [g[0] for _, g in r.pending_images], r.next_pos) for r in live])
    pvs, grids = [], []
    for r, end in zip(live, ends):
        r.next_pos = end
        for pv, g in r.pending_images:
            pvs.append(pv)
            grids.append(g)
    last = [len(r.pending) - 1 for r in live]
    if not pvs:
        return ids, attn, pos, None, None, last
    pvs = torch.cat(pvs).to(policy.device, policy.lm.visual.dtype)
    return ids, attn, pos, pvs, torch.cat(grids).to(policy.device), last


def _draw(policy, batch, ready, cfg, force):
    """One token for each row `ready` (indices), on the device. Returns (ids, log-probs) as host lists: the
    step's one copy."""
    # every row (a view, no copy) or the ready ones
    idx = slice(None) if len(ready) == len(batch.live) else torch.tensor(ready, dtype=torch.long, device=batch.h.device)
    h, keys, draws = batch.h[idx], batch.keys[idx], batch.draws[idx]
    logits = (h @ policy.head.weight.T).float() / cfg.temperature  # (B, V): only each row's last position
    log_z = torch.logsumexp(logits, -1)  # (B,) the full softmax's normaliser, as in the loss
    logits.index_fill_(1, batch.banned, -float("inf"))  # the policy never writes image pads or vision markers
    tok = _sample(logits, cfg, _uniforms(keys, draws))
    batch.draws[idx] += 1
    if force is not None:  # teacher forcing: a forced id replaces the draw (the log-prob stays the model's)
        forced = torch.tensor([-1 if t is None else t for t in (force(batch.live[b].ep) for b in ready)],
                              device=tok.device)
        tok = torch.where(forced >= 0, forced, tok)
    logp = logits.gather(1, tok[:, None])[:, 0] - log_z  # (B,) recorded log-probs
    out = torch.stack([tok.double(), logp.double()], 1).cpu()  # ids < 2^53 are exact in float64
    return [int(t) for t in out[:, 0].tolist()], out[:, 1].tolist()


def _sample(logits, cfg, u):
    """Batched draw from logits (B, V) (temperature applied, banned ids at -inf): argmax, or top-p then the
    inverse CDF at the uniforms u (B,). Zero-probability ids can never be drawn: their CDF step is empty."""
    if cfg.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits, -1)  # (B, V)
    order = None
    if cfg.top_p < 1.0:
        # ties (common: bf16 logits take few values) in id order, so which of them the nucleus keeps, and the
        # draw, do not depend on the sort's algorithm (CPU's is not stable)
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs > cfg.top_p, 0.0)  # after the nucleus is full
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    idx = torch.searchsorted(cdf, u[:, None] * total, right=True)  # the first id whose CDF exceeds u * total
    idx = torch.minimum(idx, (cdf < total).sum(-1, keepdim=True))  # u * total rounded up to total: the last id
    return (idx if order is None else order.gather(1, idx))[:, 0]


_M32 = 0xFFFFFFFF


def _mul32(x, c):
    """(x * c) mod 2^32 for x in [0, 2^32) without overflowing int64: c split in 16-bit halves. Works on ints
    and int64 tensors alike, so the host and every device compute the same bits."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & _M32


def _hash32(x):
    """lowbias32 (C. Wellons' 32-bit integer hash): a bijection on [0, 2^32) with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _uniforms(keys, counters):
    """Counter-based uniforms in [0, 1): one per (row key, draw counter), 24 bits (exact in float32)."""
    return (_hash32(_hash32(keys ^ (counters & _M32))) >> 8).float() / float(1 << 24)


def _advance(policy, row, tok, cfg):
    """Act on a sampled token. Returns False when the row is done."""
    ep = row.ep
    ends = tok in (policy.im_end, policy.end_of_text)  # what stops a generation (Qwen's generation_config)
    if ends or tok == policy.tool_call_end:
        turn_text = policy.tokenizer.decode(ep.ids[row.turn_start:])
        # a closed answer ends the episode, whatever else the turn holds (DeepEyes: an answer, then a call)
        answered = bool(tag_contents(turn_text, "<answer>", "</answer>"))
        box, err = (None, None) if answered else parse_tool_call(turn_text)
        if answered or box is not None or err is not None or ends:
            return _end_turn(policy, row, tok, box, err, cfg)
        # else a stray </tool_call> without a call: the turn goes on, within the limits below
    if len(ep.ids) - row.turn_start >= cfg.max_turn_tokens or _past_budget(ep, 0, cfg):
        ep.turns += 1
        ep.truncated = True
        return False
    return True


def _end_turn(policy, row, tok, box, err, cfg):
    """The assistant turn ended: with an answer or no call (the episode ends), or with a call (box) or a bad one
    (err), answered by the tool's turn: a crop, or an error counted per kind. A call on the last turn, or one
    whose reply would leave no room for another token, ends the episode (a bad one still counted)."""
    ep = row.ep
    ep.turns += 1
    if box is None and err is None:
        ep.finished = True
        return False
    closed = tok == policy.im_end
    if err is None and cfg.probe == "no-tool":
        err = ("disabled", "the tool is not available; answer from the image")
    if err is None and ep.num_tool_calls >= cfg.max_crops:
        err = ("limit", f"at most {cfg.max_crops} crops; give your answer")
    if err is None:
        orig_box, why = crop.check_box(box, row.shown_wh, row.source_wh)
        err = None if orig_box is not None else ("box", why)
    if err is not None:
        ep.num_tool_errors += 1
        ep.tool_errors[err[0]] += 1
    if ep.turns >= cfg.max_turns:
        ep.truncated = True
        return False
    if err is not None:
        tool_ids, request = policy.tool_turn_ids(closed, error=err[1], prompt=cfg.prompt), None
    else:
        request = _crop_request(row, orig_box, cfg)  # encoded after this step, with the other rows' crops
        tool_ids = policy.tool_turn_ids(closed, grid=request[2], prompt=cfg.prompt)
        if _past_budget(ep, len(tool_ids), cfg):  # at the global image's scale it does not fit: the budget's may
            request = _crop_request(row, orig_box, cfg, floor=False)
            tool_ids = policy.tool_turn_ids(closed, grid=request[2], prompt=cfg.prompt)
    if _past_budget(ep, len(tool_ids), cfg):  # no room for the reply and more
        ep.truncated = True
        return False
    if request is not None:
        ep.num_tool_calls += 1
        ep.boxes_shown.append([float(v) for v in box])
        cut = request[1] if cfg.probe == "gt-box" else orig_box  # the gt-box probe cut the sample's box instead
        ep.boxes.append(list(cut) if row.orig_wh is None  # in the original's pixels, whatever was cut
                        else list(crop.map_box(cut, row.source_wh, row.orig_wh)))
        ep.grids.append(request[2])
        row.crop_request = request
    ep.ids += tool_ids
    ep.loss_mask += [0] * len(tool_ids)
    ep.logps += [0.0] * len(tool_ids)
    row.pending += tool_ids
    row.turn_start = len(ep.ids)
    return True


def _past_budget(ep, more, cfg):
    """The response (everything after the prompt) with `more` tokens reaches max_response_tokens (0: no cap)."""
    return bool(cfg.max_response_tokens) and len(ep.ids) - ep.prompt_len + more >= cfg.max_response_tokens


def _crop_request(row, box, cfg, floor=True):
    """(source image, box, grid) of a crop; the probes swap the box or the pixels. The grid is known before
    encoding, so the tool turn's length is too. floor: never coarser than the global image (crop.crop_size)."""
    sample = row.ep.sample
    if cfg.probe == "gt-box" and sample.boxes:
        box = sample.boxes[0]  # the original's pixels; cut from the shown image, in its pixels
        if row.orig_wh is not None:
            box = crop.map_box(box, row.orig_wh, row.source_wh)
        box = crop.fit_box(box, row.source_wh)  # grown to the tool's least side, as the model's box would be
    x1, y1, x2, y2 = box
    h, w = crop.crop_size(box, row.shown_wh, row.source_wh, crop.tokens_to_pixels(cfg.crop_tokens), floor)
    source = row.orig
    if cfg.probe == "noise":  # the paper's probe: noise added to the crop's pixels
        source, box = crop.add_noise(row.orig[y1:y2, x1:x2], cfg.noise_sigma, seed=len(row.ep.ids)), None
    elif cfg.probe == "noise-replace":  # a stronger variant: the crop replaced by noise of the same size
        source, box = crop.noise_image(x2 - x1, y2 - y1, seed=len(row.ep.ids)).to(row.orig.device), None
    return source, box, [1, h // 14, w // 14]


def _encode_requests(rows, cfg):
    """Encode this step's crops: one call per source image (the rows of a group share their original)."""
    by_source = {}
    for r in rows:
        if r.crop_request is not None:
            by_source.setdefault(id(r.crop_request[0]), []).append(r)
    for group in by_source.values():
        source = group[0].crop_request[0]
        sizes = [(r.crop_request[2][1] * 14, r.crop_request[2][2] * 14) for r in group]
        pv, grids = crop.encode_crops(source, [r.crop_request[1] for r in group], out_hw=sizes)
        for r, part, grid in zip(group, pv.split([int(g.prod()) for g in grids]), grids):
            r.ep.pixel_values.append(part.cpu())  # episodes wait for the loss on the host, not in GPU memory
            r.pending_images.append((part, grid[None]))
            r.crop_request = None


def _finish_text(policy, ep):
    """The response as text, with image pads dropped (a crop is shown as <|vision_start|><|vision_end|>)."""
    ids = [t for t in ep.ids[ep.prompt_len:] if t != policy.image_pad]
    ep.text = policy.tokenizer.decode(ids)
