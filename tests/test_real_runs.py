"""Real-run plumbing: DeepEyes parquet and image folders, offline info-gap selection, and export of a merged
checkpoint of the tiny model (the memory estimate and the Hub layout: test_snapshot.py)."""
import dataclasses
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import crop
import data
import infogap
import model
import rewards
import rollout as rollout_module
import train
from helpers import logprobs_three_ways, move_lora, scripted, tiny_policy
from rollout import RolloutConfig, rollout


def _png(w=64, h=48, color="red"):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _deepeyes_row(i, image, answer="B", question=None, source="vstar"):
    return dict(data_source=source, prompt=[dict(role="system", content="sys"),
                                            dict(role="user", content="<image>\nWhat color is the car?")],
                images=[image], reward_model=dict(ground_truth=answer, style="model"),
                extra_info=dict(question=question, index=i), ability="vqa", env_name="visual_toolbox_v2")


def test_deepeyes_parquet(tmp_path, capsys):
    Image.new("RGB", (80, 60), "blue").save(tmp_path / "on_disk.png")
    rows = [_deepeyes_row(0, dict(bytes=_png(), path=None)),
            _deepeyes_row(1, dict(bytes=None, path="on_disk.png"), answer="a red car", question="What is it?"),
            _deepeyes_row(2, dict(bytes=b"not an image", path=None)),  # undecodable
            _deepeyes_row(3, dict(bytes=_png(), path=None), answer=""),  # no answer
            _deepeyes_row(4, dict(bytes=None, path="missing.png")),  # missing file
            _deepeyes_row(5, dict(bytes=_png(), path=None), answer="\\boxed{\\frac{1}{2}}",  # a math row
                          source="thinklite_eureka")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    samples = data.load(str(tmp_path / "train.parquet"))
    out = capsys.readouterr().out
    assert [s.id for s in samples] == ["0", "1", "5"]
    assert samples[2].answer == "\\frac{1}{2}"  # the box is not part of the answer
    # judged as math, as DeepEyes' reward judges its math rows, whatever the run's matcher; the others by it
    assert rewards.score("<answer>0.5</answer>", samples[2], [])["accuracy"] == 1.0
    assert rewards.score("<answer>0.5</answer>", dataclasses.replace(samples[2], meta={}), [])["accuracy"] == 0.0
    assert samples[0].meta == {}
    data.convert(str(tmp_path / "train.parquet"), str(tmp_path / "conv.jsonl"))  # kept by the project's JSONL
    assert [s.meta for s in data.read_jsonl(str(tmp_path / "conv.jsonl"))] == [{}, {}, {"matcher": "math"}]
    assert "skipped 3 bad row(s)" in out and "row 2" in out and "row 3" in out
    assert samples[0].question == "What color is the car?" and samples[0].answer == "B"
    assert samples[0].image().size == (64, 48) and samples[1].image().size == (80, 60)
    assert samples[1].question == "What is it?" and samples[1].category == "vstar"


def test_a_folder_of_images_with_its_jsonl(tmp_path):
    os.makedirs(tmp_path / "imgs")
    Image.new("RGB", (50, 40)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps(dict(id="a", image="imgs/a.png", question="q", answer="x")))
    (samples,) = data.load(str(tmp_path))
    assert (samples.id, samples.width) == ("a", 50)
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(SystemExit):
        data.load(str(tmp_path))  # two JSONL files: ambiguous


def test_infogap_selection_on_the_tiny_model(tmp_path, capsys):
    """The real selection end to end (its rules are in test_fidelity.py, with scripted answers)."""
    out = str(tmp_path / "levels.jsonl")
    levels = infogap.select("tiny", "synthetic:3", [16, 4], out, reference_tokens=64, max_tokens=6)
    rows = [json.loads(x) for x in open(out)]
    assert [r["id"] for r in rows] == [f"syn-0-{i}" for i in range(3)] and set(levels) == {r["id"] for r in rows}
    for r in rows:
        assert r["diverged"] == (r["global_tokens"] is not None) and r["global_tokens"] in (None, 16, 4)
        assert r["ladder"] == [16, 4] and r["reference_tokens"] == 64 and "reference" in r
    assert "never diverged" in capsys.readouterr().out
    # the ablations
    samples = data.synthetic(3)
    assert {s.global_tokens for s in infogap.prepare(train.Config(infogap="fixed:256"), samples)} == {256}
    assert {s.global_tokens for s in infogap.prepare(train.Config(infogap="off"), samples)} == {None}
    for bad in ("fixed:lots", "fixed:3"):  # a global image has at least 4 tokens
        with pytest.raises(SystemExit):
            infogap.prepare(train.Config(infogap=bad), samples)
    assert {s.global_tokens for s in infogap.prepare(train.Config(infogap="fixed:4"), samples)} == {4}


def test_infogap_off_crops_the_shown_image(monkeypatch):
    p = tiny_policy()
    call = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 40, 50]}}</tool_call>'
    force = scripted(p, {0: [call, "<answer>B</answer><|im_end|>"]})
    cfg = dict(group_size=1, max_turn_tokens=80, max_response_tokens=300, global_tokens=64, crop_tokens=32)
    (gap,) = rollout(p, data.synthetic(1, seed=2), RolloutConfig(**cfg), force=force)
    seen = []
    real = rollout_module._crop_request
    monkeypatch.setattr(rollout_module, "_crop_request",
                        lambda row, box, c, **kw: seen.append(box) or real(row, box, c, **kw))
    (off,) = rollout(p, data.synthetic(1, seed=2), RolloutConfig(**cfg, crop_from_shown=True), force=force)
    assert seen == [(10, 20, 40, 50)]  # cut from the shown image: its pixels, nothing new
    # but recorded in the original's pixels, as with the gap (what stage 2's grounding reward compares with the
    # sample's boxes): the same box within rounding
    assert gap.boxes[0][2] > 40 and max(abs(a - b) for a, b in zip(off.boxes[0], gap.boxes[0])) <= 1


def test_export_merges_and_reloads_with_the_same_logprobs(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    p = model.load_policy("tiny", lora_r=4, lora_alpha=8)
    move_lora(p)
    ckpt = tmp_path / "ckpt"
    train.save_checkpoint(str(ckpt), p, None, train.Config(model="tiny"), dict(step=1))
    model.export(str(ckpt), str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "adapter" / "adapter_model.safetensors").exists()
    a, b, base = logprobs_three_ways(p, Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "merged").eval())
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # the tiny model is fp32: the merge is exact
    assert (a - base).abs().max() > 1e-3  # the adapter mattered


def test_the_gt_box_probe_cuts_the_samples_box_from_the_shown_image_in_its_pixels(monkeypatch):
    """Without the information gap the crop source is the shown image: the probe's box (original pixels) is
    mapped into it, not cut as original pixels from a smaller image."""
    p = tiny_policy()
    call = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 40, 50]}}</tool_call>'
    force = scripted(p, {0: [call, "<answer>B</answer><|im_end|>"]})
    cfg = RolloutConfig(group_size=1, max_turn_tokens=80, max_response_tokens=300, global_tokens=64,
                        crop_tokens=32, crop_from_shown=True, probe="gt-box")
    cut = []
    real = rollout_module._crop_request
    monkeypatch.setattr(rollout_module, "_crop_request",
                        lambda row, box, c, **kw: cut.append(real(row, box, c, **kw)) or cut[-1])
    (sample,) = data.synthetic(1, seed=2)
    rollout(p, [sample], cfg, force=force)
    source, box, _ = cut[0]
    (sh, sw), (w, h) = source.shape[:2], (sample.width, sample.height)
    expected = (sample.boxes[0][0] * sw / w, sample.boxes[0][1] * sh / h,
                sample.boxes[0][2] * sw / w, sample.boxes[0][3] * sh / h)
    assert tuple(box) == crop.fit_box(expected, (sw, sh))  # grown to the tool's 28 px, as the model's box would be
    assert min(box[2] - box[0], box[3] - box[1]) >= 28 and box[2] <= sw and box[3] <= sh
    # with the gap, the crop is the sample's box in the original, and the episode records that box, not the model's
    cut.clear()
    (ep,) = rollout(p, [sample], dataclasses.replace(cfg, crop_from_shown=False), force=force)
    assert list(cut[0][1]) == ep.boxes[0] == [round(v) for v in sample.boxes[0]] != ep.boxes_shown[0]
