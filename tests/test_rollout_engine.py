"""The rollout engine: each token and image goes through the model once; the baseline engine agrees; the
tool-call parser and box checks never raise on hostile model output (property tests)."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crop
import data
import rollout as rollout_module
from helpers import ANSWER, CALL, assert_logprobs_replay, rollout_cfg, scripted, tiny_policy
from rollout import RolloutConfig, _hash32, _sample, _uniforms, parse_tool_call, rollout



def _cfg(**kw):  # three rows per group, sampled at 0.9
    return rollout_cfg(**{**dict(group_size=3, global_tokens=48, temperature=0.9), **kw})


def _script(p):
    return scripted(p, {0: [CALL.format("[5, 5, 60, 40]"), CALL.format("[0, 0, 20, 20]"), ANSWER],
                        1: ["<think>hm</think>" + CALL.format("[30, 10, 50, 90]"), ANSWER]})


class _Counter:
    """Counts real tokens entering the language model and patches entering the vision tower. Only on the
    dynamic decode path (`decode="dynamic"`): a graph replay runs no hooks, and the static path's mask is the
    whole buffer. tests/test_decode.py checks that the static paths give the dynamic path's episodes."""

    def __init__(self, p):
        self.tokens = self.patches = 0
        self.hooks = [p.lm.language_model.register_forward_pre_hook(self._lm, with_kwargs=True),
                      p.lm.visual.register_forward_pre_hook(self._vis, with_kwargs=True)]

    def _lm(self, module, args, kwargs):
        length = kwargs["inputs_embeds"].shape[1]
        self.tokens += int(kwargs["attention_mask"][:, -length:].sum())  # this call's real (unpadded) tokens

    def _vis(self, module, args, kwargs):
        self.patches += (args[0] if args else kwargs["hidden_states"]).shape[0]

    def close(self):
        for h in self.hooks:
            h.remove()


def test_every_token_and_image_goes_through_the_model_once():
    p = tiny_policy()
    samples = data.synthetic(2, seed=11)
    counter = _Counter(p)
    try:
        eps = rollout(p, samples, _cfg(decode="dynamic"), force=_script(p))
    finally:
        counter.close()
    heads = eps[::3]
    assert sum(e.num_tool_calls for e in eps) >= 9
    # the prompt (and its image) once per group; every later token once, except each row's last one, which
    # ended the episode and was never fed back
    assert counter.tokens == sum(e.prompt_len for e in heads) + sum(len(e.ids) - e.prompt_len - 1 for e in eps)
    assert counter.patches == sum(e.pixel_values[0].shape[0] for e in heads) + sum(
        pv.shape[0] for e in eps for pv in e.pixel_values[1:])


def test_baseline_engine_agrees_and_does_more_work():
    p = tiny_policy()
    samples = data.synthetic(2, seed=11)
    fast = rollout(p, samples, _cfg(), force=_script(p))
    counter = _Counter(p)
    try:
        slow = rollout(p, samples, _cfg(reuse_cache=False, decode="dynamic"), force=_script(p))
    finally:
        counter.close()
    assert [e.ids for e in fast] == [e.ids for e in slow]
    a = torch.tensor([x for e in fast for x in e.logps])
    b = torch.tensor([x for e in slow for x in e.logps])
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    once = sum(e.prompt_len for e in fast[::3]) + sum(len(e.ids) - e.prompt_len - 1 for e in fast)
    assert counter.tokens > 2 * once


def test_counts_per_episode():
    p = tiny_policy()
    force = scripted(p, {0: [CALL.format("[1, 2]"), CALL.format("[5, 5, 60, 40]"), ANSWER]})
    (e,) = rollout(p, data.synthetic(1, seed=12), _cfg(group_size=1), force=force)
    assert (e.turns, e.num_tool_calls, e.num_tool_errors, dict(e.tool_errors)) == (3, 1, 1, {"box": 1})
    assert e.num_generated == len(p.encode(CALL.format("[1, 2]") + CALL.format("[5, 5, 60, 40]") + ANSWER))
    assert e.finished and not e.truncated


def test_top_p_and_greedy():
    u = torch.linspace(0, 1 - 2 ** -24, 200)  # the whole range of uniforms, both ends included
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0]).expand(200, 4)
    assert set(_sample(logits, RolloutConfig(top_p=0.3), u).tolist()) == {1}  # only the top token fits
    assert set(_sample(logits, RolloutConfig(top_p=0.9), u).tolist()) == {1, 2}
    assert set(_sample(logits, RolloutConfig(), u).tolist()) == {0, 1, 2, 3}
    assert set(_sample(logits, RolloutConfig(greedy=True), u).tolist()) == {1}


def test_top_p_keeps_tied_ids_in_id_order():
    """bf16 logits take few distinct values, so ties are common: the nucleus takes tied ids lowest first, and a
    uniform maps to the same id whatever the sort algorithm (CPU's unstable sort scattered them)."""
    logits = torch.zeros(1, 4096)
    logits[0, 4000] = 0.5  # one above the rest; then 4,095 ties
    u = torch.linspace(0, 1 - 2 ** -24, 200)
    drawn = [int(_sample(logits, RolloutConfig(top_p=0.1), u[i:i + 1])) for i in range(len(u))]
    assert drawn[0] == 4000 and drawn[1] == 0  # the largest first, then the ties from id 0
    assert drawn[1:] == sorted(drawn[1:]) and drawn[-1] < 420  # ids in order, the nucleus ~10% of the ties


def test_banned_ids_are_never_drawn():
    """-inf logits have an empty CDF step: no uniform, not even 0 or the largest, lands on them."""
    u = torch.tensor([0.0, 0.5, 1 - 2 ** -24, 1 - 2 ** -24])
    logits = torch.tensor([[-float("inf"), 1.0, -float("inf")], [2.0, -float("inf"), -float("inf")],
                           [1.0, 1.0, -float("inf")], [-float("inf"), -float("inf"), 5.0]])
    for top_p in (1.0, 0.5):
        assert _sample(logits, RolloutConfig(top_p=top_p), u).tolist() == [1, 0, 1, 2]


def test_uniforms_are_counter_based_and_uniform():
    """The same (key, counter) gives the same uniform on any batch; ints and tensors hash to the same bits; the
    draws of 4,096 (key, counter) pairs look uniform (a coarse chi-square)."""
    keys = torch.arange(64).repeat_interleave(64).mul(2654435761) % (1 << 32)
    counters = torch.arange(64).repeat(64)
    u = _uniforms(keys, counters)
    assert torch.equal(u[100:164], _uniforms(keys[100:164], counters[100:164]))
    assert _hash32(int(keys[7])) == int(_hash32(keys[7:8])[0])
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u, bins=16, min=0, max=1)
    expected = len(u) / 16
    assert float(((counts - expected) ** 2 / expected).sum()) < 40  # chi-square, 15 dof: p < 0.001 above 37.7


# ---------------------------------------------------------------- property tests: model output is hostile

numbers = st.one_of(st.integers(-10**400, 10**400), st.floats(allow_nan=True, allow_infinity=True),
                    st.just(1e308), st.text(max_size=5), st.none(), st.booleans(),
                    st.lists(st.integers(), max_size=3))
json_values = st.recursive(st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=10)),
                           lambda kids: st.one_of(st.lists(kids, max_size=5),
                                                  st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=20)


def _check(text, shown=(280, 196), orig=(3000, 2100)):
    box, err = parse_tool_call(text)
    if err is not None:
        assert box is None and isinstance(err, tuple) and isinstance(err[0], str) and isinstance(err[1], str)
        return None
    if box is None:
        return None
    out, why = crop.check_box(box, shown, orig)
    if out is None:
        assert isinstance(why, str) and why
        return None
    x1, y1, x2, y2 = out
    assert all(isinstance(v, int) for v in out)
    assert 0 <= x1 < x2 <= orig[0] and 0 <= y1 < y2 <= orig[1]
    assert x2 - x1 >= crop.MIN_SIDE and y2 - y1 >= crop.MIN_SIDE
    return out


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text_never_raises(text):
    _check(text)
    _check("<tool_call>" + text + "</tool_call>")
    _check("<tool_call>" + text)


@settings(max_examples=300, deadline=None)
@given(name=st.one_of(st.just("image_zoom_in_tool"), st.text(max_size=12)), args=json_values,
       bbox=st.lists(numbers, max_size=6), extra=st.dictionaries(st.text(max_size=6), json_values, max_size=3),
       as_string=st.booleans(), repeat=st.integers(1, 2))
def test_structured_calls_never_raise(name, args, bbox, extra, as_string, repeat):
    arguments = {"bbox_2d": bbox, **extra} if isinstance(args, (dict, type(None))) else args
    if as_string:
        arguments = json.dumps(arguments)
    call = "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"
    _check("<think>ü 中文 🙂</think>" + call * repeat)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=4, max_size=4))
def test_finite_boxes_are_either_cropped_or_refused(box):
    """Refused exactly when the box misses the image or, clamped and grown to 28 px, is over 100:1."""
    out = _check(CALL.format(json.dumps(box)))
    x1, y1, x2, y2 = box
    inside = x2 > x1 and y2 > y1 and x2 > 0 and y2 > 0 and x1 < 280 and y1 < 196
    if not inside:
        assert out is None
        return
    sx, sy = 3000 / 280, 2100 / 196  # shown -> original
    w = max(crop.MIN_SIDE, (min(x2, 280) - max(x1, 0)) * sx)
    h = max(crop.MIN_SIDE, (min(y2, 196) - max(y1, 0)) * sy)
    aspect = max(w, h) / min(w, h)
    assert (out is None) == (aspect > 100) or abs(aspect - 100) < 1  # rounding to whole pixels decides at 100


def test_crops_of_a_step_are_encoded_in_one_call(monkeypatch):
    """The rows of a group crop their shared original in the same step: one encode call per step."""
    p = tiny_policy()
    calls = []
    real = crop.encode_crops
    monkeypatch.setattr(crop, "encode_crops", lambda image, boxes, **kw: calls.append(len(boxes)) or real(image, boxes, **kw))
    force = scripted(p, {0: [CALL.format("[5, 5, 60, 40]"), CALL.format("[0, 0, 20, 20]"), ANSWER]})
    eps = rollout(p, data.synthetic(1, seed=13), _cfg(group_size=3), force=force)
    assert sum(e.num_tool_calls for e in eps) == 6
    assert calls == [1, 3, 3]  # the global image, then each step's three crops together


def test_waiting_groups_take_finished_rows_places():
    """Continuous batching: with room for two groups of two, the third prompt joins when group 1 finishes,
    its cache padded to the live one's length. The episodes, the recorded log-probs (equal to a full forward)
    and the work done are those of one big batch."""
    p = tiny_policy()
    samples = data.synthetic(3, seed=14)
    # group 1 ends first; group 2 joins group 0 (still writing) and calls the tool after joining
    script = {0: ["<think>hm</think>" + ANSWER], 1: [ANSWER], 2: [CALL.format("[30, 10, 50, 90]"), ANSWER]}
    joins = []
    real_join = rollout_module._join
    counter = _Counter(p)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(rollout_module, "_join", lambda a, b: joins.append(len(a.live)) or real_join(a, b))
            cfg = _cfg(group_size=2, rollout_rows=4, decode="dynamic")
            small = rollout(p, samples, cfg, force=scripted(p, script))
    finally:
        counter.close()
    big = rollout(p, samples, _cfg(group_size=2, rollout_rows=64), force=scripted(p, script))
    assert joins == [2]  # group 1 finished; group 0 was still in flight when group 2 joined it
    assert [e.group for e in small] == [0, 0, 1, 1, 2, 2]
    assert [e.ids for e in small] == [e.ids for e in big]
    assert_logprobs_replay(p, small, temperature=0.9)
    once = sum(e.prompt_len for e in small[::2]) + sum(len(e.ids) - e.prompt_len - 1 for e in small)
    assert counter.tokens == once


def test_tool_turns_run_apart_wait_for_each_other_and_leave_no_padding_columns(monkeypatch):
    """A tool turn's chunk runs apart from the decoding rows (padded together, each would pay for the chunk's
    length), and after it the decoding rows' new padding columns are squeezed out: turns at different steps
    would otherwise grow the cache, and every step's attention, far past the rows' real lengths. Run at once
    (tool_wait=0), every decode step is on a cache as wide as its longest row. Allowed to wait, the three
    staggered turns share one forward, and the waiting rows write the very tokens they wrote without waiting.
    The log-probs equal a full forward."""
    p = tiny_policy()
    script = {0: [CALL.format("[5, 5, 60, 40]")], 1: ["<think>" + "look " * 8 + "</think>"
                                                      + CALL.format("[30, 10, 50, 90]"), ANSWER],
              2: ["<think>" + "hm " * 20 + "</think>" + CALL.format("[0, 0, 20, 20]"), ANSWER]}
    scripted_force, free = scripted(p, script), len(p.encode(script[0][0]))

    def force(ep):  # group 0 calls first and waits longest, then samples 5 tokens: its draws must not move meanwhile
        if ep.group == 0 and ep.num_generated >= free:
            return None if ep.num_generated < free + 5 else p.im_end
        return scripted_force(ep)

    seen, real_forward = [], rollout_module._forward

    def forward(policy, rows, cache, mask_hist):
        pending = [len(r.pending) for r in rows]
        seen.append((mask_hist.shape[1], int(mask_hist.sum(1).max()) if mask_hist.numel() else 0, max(pending),
                     1 < max(pending) and 1 in pending))  # (width, longest row, longest chunk, chunk + decoding)
        return real_forward(policy, rows, cache, mask_hist)

    monkeypatch.setattr(rollout_module, "_forward", forward)
    runs = {}
    for wait in (0, 100):
        seen.clear()
        cfg = _cfg(group_size=2, rollout_rows=6, decode="dynamic", max_turn_tokens=160, max_response_tokens=600,
                   tool_wait=wait)
        eps = rollout(p, data.synthetic(3, seed=15), cfg, force=force)
        assert sum(e.num_tool_calls for e in eps) == 6 and not any(mixed for *_, mixed in seen)
        runs[wait] = eps, [pending for _, _, pending, _ in seen if pending > 1]
        if wait == 0:
            assert all(width == longest for width, longest, chunk, _ in seen if chunk == 1)  # every decode step
    assert len(runs[0][1]) == 4 and len(runs[100][1]) == 2  # the prefill, then three turns or one for all three
    assert [e.ids for e in runs[100][0]] == [e.ids for e in runs[0][0]]
    for eps, _ in runs.values():
        assert_logprobs_replay(p, eps, temperature=0.9)


def test_rows_admitted_with_a_longer_cache_than_those_in_flight_join_them():
    """A new prompt's larger image can make the joining side the wider one: both sides are padded to the wider."""
    from types import SimpleNamespace

    def batch(rows, width):
        layer = SimpleNamespace(keys=torch.ones(rows, 2, width, 4), values=torch.ones(rows, 2, width, 4))
        zeros = torch.zeros(rows, dtype=torch.long)
        return rollout_module._Batch(list(range(rows)), torch.zeros(rows, 8), SimpleNamespace(layers=[layer]),
                                     torch.ones(rows, width), zeros, zeros, torch.tensor([]))

    for wa, wb in ((3, 5), (5, 3)):
        joined = rollout_module._join(batch(2, wa), batch(1, wb))
        keys, values = joined.cache.layers[0].keys, joined.cache.layers[0].values
        assert keys.shape == (3, 2, 5, 4) and joined.mask_hist.shape == (3, 5)
        assert joined.mask_hist.sum(1).tolist() == values[:, 0, :, 0].sum(1).tolist() == [wa, wa, wb]
