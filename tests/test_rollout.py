"""rollout.py: the tool protocol, crops from the original, masks, limits, and exact log-probs."""
import dataclasses

import pytest
import torch

import crop
import data
import model
import rollout as rollout_module
from helpers import ANSWER, CALL, assert_logprobs_replay, rollout_cfg, scripted, tiny_policy
from rollout import parse_tool_call, rollout



@pytest.mark.parametrize("text,box,kind", [
    (CALL.format("[1, 2, 30, 40]"), [1, 2, 30, 40], None),
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": "{\\"bbox_2d\\": [1, 2, 3, 4]}"}</tool_call>', [1, 2, 3, 4], None),
    ("no call at all", None, None),
    ("<tool_call>{broken json</tool_call>", None, "json"),
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2]', None, "unclosed"),
    ('<tool_call>{"name": "rm -rf", "arguments": {"bbox_2d": [1, 2, 3, 4]}}</tool_call>', None, "name"),
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"box": [1, 2, 3, 4]}}</tool_call>', None, "args"),
    ('<tool_call>[1, 2, 3, 4]</tool_call>', None, "json"),
    (CALL.format("[1, 2, 3, 4]") + CALL.format("[5, 6, 7, 8]"), None, "multiple"),
    ("<tool_call>" + "[" * 100000 + "</tool_call>", None, "json"),
    # arguments as a JSON string that does not parse: a bad call, not a crash
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": "{\\"bbox_2d\\": [1, 2"}</tool_call>', None, "args"),
])
def test_parse_tool_call(text, box, kind):
    got, err = parse_tool_call(text)
    assert got == box
    assert (err[0] if err else None) == kind
    if err:
        assert isinstance(err[1], str) and err[1]


def test_tool_call_crops_the_original_and_masks_the_reply():
    p = tiny_policy()
    samples = data.synthetic(2, seed=5)
    force = scripted(p, {0: [CALL.format("[10, 20, 40, 50]"), ANSWER], 1: [ANSWER]})
    eps = rollout(p, samples, rollout_cfg(), force=force)
    assert len(eps) == 4 and [e.group for e in eps] == [0, 0, 1, 1]
    e = eps[0]
    shown_w, shown_h = e.grids[0][2] * 14, e.grids[0][1] * 14
    sx, sy = samples[0].width / shown_w, samples[0].height / shown_h
    assert e.boxes_shown == [[10.0, 20.0, 40.0, 50.0]]
    assert e.boxes == [[round(10 * sx), round(20 * sy), round(40 * sx), round(50 * sy)]]  # original frame
    assert e.num_tool_calls == 1 and e.num_tool_errors == 0 and e.turns == 2 and e.finished
    assert len(e.pixel_values) == 2 and len(e.grids) == 2
    # every image pad and every token the harness wrote has loss mask 0; the script's tokens have 1
    written = [t for t, m in zip(e.ids, e.loss_mask) if m]
    assert written == p.encode(CALL.format("[10, 20, 40, 50]") + ANSWER)
    assert all(m == 0 for t, m in zip(e.ids, e.loss_mask) if t == p.image_pad)
    assert e.ids.count(p.image_pad) == sum(g[0] * g[1] * g[2] // 4 for g in e.grids)
    assert "<tool_response><|vision_start|><|vision_end|>" + model.DEEPEYES_USER + "</tool_response>" in e.text
    # the model stopped at </tool_call>: the harness closes its turn as the chat template does
    assert "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>" in e.text
    assert e.text.endswith("<answer>B</answer><|im_end|>")
    assert eps[2].num_tool_calls == 0 and eps[2].finished


@pytest.mark.parametrize("bad,kind", [
    ("[1, 2, 3]", "box"), ("[50, 50, 10, 10]", "box"), ('["a", 1, 2, 3]', "box"), ("[NaN, 1, 2, 3]", "box"),
    ("[1e999, 1, 2, 3]", "box"), ("[9000, 9000, 9999, 9999]", "box"),
])
def test_bad_box_gets_an_error_turn_and_the_episode_goes_on(bad, kind):
    p = tiny_policy()
    force = scripted(p, {0: [CALL.format(bad), ANSWER]})
    (e,) = rollout(p, data.synthetic(1, seed=6), rollout_cfg(group_size=1), force=force)
    assert e.num_tool_errors == 1 and e.tool_errors[kind] == 1 and e.num_tool_calls == 0
    assert "<|im_start|>user\nError: " in e.text  # DeepEyes' error turn
    assert e.finished and e.text.endswith("<answer>B</answer><|im_end|>")
    assert len(e.pixel_values) == 1


def test_limits_stop_episodes():
    p = tiny_policy()
    call = CALL.format("[10, 20, 40, 50]")
    # max_turns: the third tool call comes at turn 3 of 3 -> truncated
    (e,) = rollout(p, data.synthetic(1, seed=7), rollout_cfg(group_size=1, max_turns=3), force=scripted(p, {0: [call] * 5}))
    assert e.truncated and not e.finished and e.turns == 3 and e.num_tool_calls == 2
    # max_crops: later calls are answered with an error
    (e,) = rollout(p, data.synthetic(1, seed=7), rollout_cfg(group_size=1, max_crops=1),
                   force=scripted(p, {0: [call, call, ANSWER]}))
    assert e.num_tool_calls == 1 and e.tool_errors["limit"] == 1 and e.finished
    # a turn longer than max_turn_tokens is cut
    (e,) = rollout(p, data.synthetic(1, seed=7), rollout_cfg(group_size=1, max_turn_tokens=10),
                   force=scripted(p, {0: ["<think>" + "word " * 50]}))
    assert e.truncated and sum(e.loss_mask) == 10
    # a tool reply that would overflow the response budget is not appended
    (e,) = rollout(p, data.synthetic(1, seed=7), rollout_cfg(group_size=1, max_response_tokens=60),
                   force=scripted(p, {0: [call, ANSWER]}))
    assert e.truncated and e.num_tool_calls == 0 and len(e.ids) - e.prompt_len <= 60
    # max_response_tokens=0: no cap on the episode's length (evaluation's default, as DeepEyes evaluates)
    (e,) = rollout(p, data.synthetic(1, seed=7), rollout_cfg(group_size=1, max_response_tokens=0),
                   force=scripted(p, {0: [call, call, ANSWER]}))
    assert e.finished and not e.truncated and e.num_tool_calls == 2 and len(e.ids) - e.prompt_len > 60


def test_turn_ends_and_limits_follow_the_protocol():
    p = tiny_policy()
    s = data.synthetic(1, seed=7)
    call = CALL.format("[10, 20, 40, 50]")
    # a closed answer ends the episode even when the turn stopped at a tool call (DeepEyes); an answer tag that is
    # not closed does not, and the call is made
    (e,) = rollout(p, s, rollout_cfg(group_size=1), force=scripted(p, {0: ["<answer>B</answer>" + call, ANSWER]}))
    assert e.finished and e.turns == 1 and e.num_tool_calls == 0 and len(e.pixel_values) == 1
    (e,) = rollout(p, s, rollout_cfg(group_size=1), force=scripted(p, {0: ["<think><answer> later</think>" + call,
                                                                         ANSWER]}))
    assert e.num_tool_calls == 1 and e.finished and e.turns == 2
    # a stray </tool_call> inside a turn is no turn: with max_turns=2 the call after it is still made
    (e,) = rollout(p, s, rollout_cfg(group_size=1, max_turns=2),
                   force=scripted(p, {0: ["<think>a</tool_call> b</think>" + call, ANSWER]}))
    assert e.num_tool_calls == 1 and e.finished and e.turns == 2
    # a bad call on the last turn ends the episode and is still counted
    (e,) = rollout(p, s, rollout_cfg(group_size=1, max_turns=1), force=scripted(p, {0: ["<tool_call>{bad</tool_call>"]}))
    assert e.truncated and e.num_tool_errors == 1 and e.tool_errors["json"] == 1
    # <|endoftext|> (Qwen's other end token) ends a turn as <|im_end|> does
    (e,) = rollout(p, s, rollout_cfg(group_size=1), force=scripted(p, {0: ["<answer>B</answer><|endoftext|>"]}))
    assert e.finished and e.ids[-1] == p.end_of_text


def test_a_turn_that_ends_without_a_call_or_an_answer_ends_the_episode():
    """<|im_end|> after a turn with neither a tool call nor an answer ends the episode there (finished, not cut
    by a limit): the model said its piece, and nothing is sampled after the end token."""
    p = tiny_policy()
    turn = "<think>I cannot tell</think><|im_end|>"
    (e,) = rollout(p, data.synthetic(1, seed=7), rollout_cfg(group_size=1), force=scripted(p, {0: [turn]}))
    assert e.finished and not e.truncated and e.turns == 1 and e.num_tool_calls == e.num_tool_errors == 0
    assert e.ids[e.prompt_len:] == p.encode(turn) and e.ids[-1] == p.im_end


def test_a_tool_reply_that_fills_the_response_budget_leaves_no_token_past_it():
    p = tiny_policy()
    s = data.synthetic(1, seed=7)
    force = scripted(p, {0: [CALL.format("[10, 20, 40, 50]"), ANSWER]})
    (e,) = rollout(p, s, rollout_cfg(group_size=1), force=force)
    reply_end = e.prompt_len + next(i for i in range(len(e.ids) - e.prompt_len)  # the first token after the reply
                                    if e.loss_mask[e.prompt_len + i] == 0 and e.loss_mask[e.prompt_len + i + 1] == 1) + 1
    budget = reply_end - e.prompt_len  # the call and its reply fill it exactly
    (e,) = rollout(p, s, rollout_cfg(group_size=1, max_response_tokens=budget), force=force)
    assert e.truncated and len(e.ids) - e.prompt_len <= budget and e.num_tool_calls == 0


def test_a_crop_at_the_global_images_scale_that_does_not_fit_comes_back_at_the_crop_budget():
    p = tiny_policy()
    s = data.synthetic(1, seed=7)
    force = scripted(p, {0: [CALL.format("[0, 0, 200, 150]"), ANSWER]})
    cfg = dict(group_size=1, global_tokens=256, crop_tokens=16)
    (e,) = rollout(p, s, rollout_cfg(**cfg), force=force)
    floored = e.grids[1]  # the large box, at the global image's scale: more than the 16-token budget gives
    assert floored[1] * floored[2] // 4 > 16 and not e.truncated
    budget = e.loss_mask.index(1, e.loss_mask.index(0, e.prompt_len)) - e.prompt_len  # the call and that reply
    (e,) = rollout(p, s, rollout_cfg(**cfg, max_response_tokens=budget), force=force)  # no room after them
    assert e.finished and not e.truncated and e.num_tool_calls == 1 and len(e.ids) - e.prompt_len < budget
    assert e.grids[1][1] * e.grids[1][2] // 4 <= 16


def test_written_tokens_stop_at_the_response_budget_exactly():
    """A turn that writes on (no call, no end) within max_turn_tokens is cut at max_response_tokens: the response
    holds exactly that many tokens, not one more."""
    p = tiny_policy()
    (e,) = rollout(p, data.synthetic(1, seed=7), rollout_cfg(group_size=1, max_turn_tokens=80, max_response_tokens=12),
                   force=scripted(p, {0: ["<think>" + "word " * 50]}))
    assert e.truncated and not e.finished and e.turns == 1
    assert len(e.ids) - e.prompt_len == 12 and sum(e.loss_mask) == 12


def test_a_batch_whose_every_image_is_bad_rolls_out_nothing_and_keeps_each_reason(monkeypatch):
    """Evaluation counts the episodes a batch returns (and the selection iterates them): an empty list, not None."""
    samples = data.synthetic(2)

    def bad_image(policy, batch, cfg):
        raise crop.BadImage(f"sample {batch[0].id}: image file is truncated", batch[0].id)

    monkeypatch.setattr(rollout_module, "rollout", bad_image)
    bad = {}
    assert rollout_module.rollout_skipping_bad_images(None, samples, rollout_cfg(), bad) == []
    assert sorted(bad) == sorted(s.id for s in samples) and all("truncated" in r for r in bad.values())


def test_recorded_logprobs_equal_a_full_forward():
    """The log-probs recorded while sampling (KV cache, padding, rows in different states) equal those of one
    forward over each final sequence, as train.py computes them."""
    p = tiny_policy()
    samples = data.synthetic(2, seed=8)
    force = scripted(p, {0: [CALL.format("[5, 5, 60, 40]"), CALL.format("[0, 0, 20, 20]")],
                         1: ["<think>hmm</think>" + CALL.format("[30, 10, 50, 90]")]})
    eps = rollout(p, samples, rollout_cfg(group_size=3, max_turn_tokens=90, temperature=0.9), force=force)
    assert sum(e.num_tool_calls for e in eps) >= 6 and len({len(e.ids) for e in eps}) > 1
    assert_logprobs_replay(p, eps, temperature=0.9)


def test_the_gt_box_probe_cuts_a_thin_annotated_box():
    """A ground-truth box one pixel high (valid data) is cut as the tool cuts any box: grown to 28 px (it raised
    in smart_resize's aspect check)."""
    p = tiny_policy()
    s = dataclasses.replace(data.synthetic(1, seed=10)[0], boxes=[[100, 486, 400, 487]])
    force = scripted(p, {0: [CALL.format("[10, 20, 40, 50]"), ANSWER]})
    (gt,) = rollout(p, [s], rollout_cfg(group_size=1, probe="gt-box"), force=force)
    x1, y1, x2, y2 = gt.boxes[0]
    assert (x1, x2, y2 - y1) == (100, 400, 28) and y1 <= 486 and y2 >= 487


def test_the_gt_box_probe_on_an_item_without_boxes_cuts_the_models_box():
    p = tiny_policy()
    s = dataclasses.replace(data.synthetic(1, seed=10)[0], boxes=None)  # an HR-Bench item has none
    force = scripted(p, {0: [CALL.format("[10, 20, 40, 50]"), ANSWER]})
    (gt,) = rollout(p, [s], rollout_cfg(group_size=1, probe="gt-box"), force=force)
    (plain,) = rollout(p, [s], rollout_cfg(group_size=1), force=force)
    assert gt.boxes == plain.boxes and gt.num_tool_calls == 1


def test_sampling_is_seeded():
    p = tiny_policy()
    s = data.synthetic(1, seed=9)
    a = rollout(p, s, rollout_cfg(max_turn_tokens=12), step=3)
    b = rollout(p, s, rollout_cfg(max_turn_tokens=12), step=3)
    c = rollout(p, s, rollout_cfg(max_turn_tokens=12), step=4)
    assert [e.ids for e in a] == [e.ids for e in b]
    assert [e.ids for e in a] != [e.ids for e in c]
    assert a[0].ids != a[1].ids  # group members differ


def test_probes():
    p = tiny_policy()
    s = data.synthetic(1, seed=10)
    force = scripted(p, {0: [CALL.format("[10, 20, 40, 50]"), ANSWER]})
    (gt,) = rollout(p, s, rollout_cfg(group_size=1, probe="gt-box"), force=force)
    (plain,) = rollout(p, s, rollout_cfg(group_size=1), force=force)
    (noise,) = rollout(p, s, rollout_cfg(group_size=1, probe="noise"), force=force)
    (off,) = rollout(p, s, rollout_cfg(group_size=1, probe="no-tool"), force=force)
    assert gt.pixel_values[1].shape != plain.pixel_values[1].shape or not torch.equal(gt.pixel_values[1], plain.pixel_values[1])
    assert noise.grids == plain.grids and not torch.allclose(noise.pixel_values[1], plain.pixel_values[1])
    assert off.num_tool_calls == 0 and off.tool_errors["disabled"] == 1
    assert "image_zoom_in_tool" not in p.tokenizer.decode(off.ids[:off.prompt_len])
