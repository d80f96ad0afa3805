"""Real-run plumbing: DeepEyes parquet and image folders, offline info-gap selection, the memory estimate,
and export of a merged checkpoint."""
import io
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
import infogap
import model
import train
from helpers import scripted, tiny_policy
from rollout import RolloutConfig, rollout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(w=64, h=48, color="red"):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _deepeyes_row(i, image, answer="B", question=None):
    return dict(data_source="vstar", prompt=[dict(role="system", content="sys"),
                                            dict(role="user", content="<image>\nWhat color is the car?")],
                images=[image], reward_model=dict(ground_truth=answer, style="model"),
                extra_info=dict(question=question, index=i), ability="vqa", env_name="visual_toolbox_v2")


def test_deepeyes_parquet(tmp_path, capsys):
    Image.new("RGB", (80, 60), "blue").save(tmp_path / "on_disk.png")
    rows = [_deepeyes_row(0, dict(bytes=_png(), path=None)),
            _deepeyes_row(1, dict(bytes=None, path="on_disk.png"), answer="a red car", question="What is it?"),
            _deepeyes_row(2, dict(bytes=b"not an image", path=None)),  # undecodable
            _deepeyes_row(3, dict(bytes=_png(), path=None), answer=""),  # no answer
            _deepeyes_row(4, dict(bytes=None, path="missing.png"))]  # missing file
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    samples = data.load(str(tmp_path / "train.parquet"))
    out = capsys.readouterr().out
    assert [s.id for s in samples] == ["0", "1"]
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
    out = str(tmp_path / "levels.jsonl")
    levels = infogap.select("tiny", "synthetic:3", [64, 16, 4], out, max_tokens=6)
    rows = [json.loads(x) for x in open(out)]
    assert [r["id"] for r in rows] == [f"syn-0-{i}" for i in range(3)]
    for r in rows:
        answers = [r["answers"][k] for k in ("64", "16", "4")]
        first = next((k for k in (1, 2) if answers[k] != answers[0]), None)
        assert r["global_tokens"] == [64, 16, 4][first if first else -1] and r["diverged"] == (first is not None)
    assert levels == {r["id"]: (r["global_tokens"], r["diverged"]) for r in rows}
    assert "levels (global tokens: samples)" in capsys.readouterr().out
    infogap.select("tiny", "synthetic:3", [64, 16, 4], out, max_tokens=6)  # resumable: nothing is redone
    assert len(open(out).readlines()) == 3
    # train.py reads them, and the ablations
    samples = data.synthetic(3)
    infogap.assign(out, samples)
    assert [s.global_tokens for s in samples] == [r["global_tokens"] for r in rows]
    infogap.assign("fixed:256", samples)
    assert {s.global_tokens for s in samples} == {256}
    with pytest.raises(SystemExit):
        infogap.assign("fixed:lots", samples)


def test_infogap_off_crops_the_shown_image():
    p = tiny_policy()
    call = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 40, 50]}}</tool_call>'
    force = scripted(p, {0: [call, "<answer>B</answer><|im_end|>"]})
    cfg = dict(group_size=1, max_turn_tokens=80, max_response_tokens=300, global_tokens=64, crop_tokens=32)
    (gap,) = rollout(p, data.synthetic(1, seed=2), RolloutConfig(**cfg), force=force)
    (off,) = rollout(p, data.synthetic(1, seed=2), RolloutConfig(**cfg, crop_from_shown=True), force=force)
    assert off.boxes == [[10, 20, 40, 50]]  # the crop source is the shown image: no mapping, no new pixels
    assert gap.boxes != off.boxes and gap.boxes[0][2] > 40  # with the gap: mapped to the original


def test_memory_estimate_for_7b_by_hand():
    cfg = train.Config(model="Qwen/Qwen2.5-VL-7B-Instruct", **train.PRESETS["24gb"])
    est = model.estimate_memory(cfg)
    # language-model linears: 28 layers x (2*3584^2 + 2*3584*512 + 3*3584*18944) = 6,525,288,448 parameters in NF4
    # (0.5 bytes + 0.127 bits of double-quantised constants); embeddings and head 2 x 152,064 x 3,584 bf16;
    # vision tower about 676 M bf16
    weights = 6_525_288_448 * (0.5 + 0.127 / 8) + 2 * 152_064 * 3_584 * 2 + 676e6 * 2
    assert est["weights"] == pytest.approx(weights / 1e9) and 6.8 < est["weights"] < 7.0
    # KV cache: 16 rows x (400 + 1,024 + 2,048) tokens x 28 layers x K,V x 4 heads x 128 x 2 bytes = 57,344 B/token
    assert est["kv_cache"] == pytest.approx(16 * 3472 * 57_344 / 1e9)
    # LoRA r=16: per layer 16 x (2*3584 + 2*3584 + 2*(3584+512) + 3*(3584+18944)) parameters, 16 bytes each
    assert est["lora_and_optimizer"] == pytest.approx(28 * 16 * (4 * 3584 + 2 * 4096 + 3 * 22528) * 16 / 1e9)
    assert est["peak"] < 24


def test_dry_run_prints_the_estimate_and_refuses_what_does_not_fit():
    run = lambda *a: subprocess.run([sys.executable, "train.py", *a], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                    timeout=120)
    ok = run("--preset", "24gb", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--dry-run")
    assert ok.returncode == 0 and "estimated peak GPU memory (GB)" in ok.stdout
    peak = float(ok.stdout.split("peak ")[-1].split()[0])
    assert peak < 24
    too_big = run("--preset", "24gb", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--dry-run",
                  "--gradient_checkpointing=false")
    assert too_big.returncode != 0 and "exceeds memory_gb=24" in too_big.stderr and "Traceback" not in too_big.stderr
    forced = run("--preset", "24gb", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--dry-run",
                 "--gradient_checkpointing=false", "--ignore_memory_estimate=true")
    assert forced.returncode == 0


def test_export_merges_and_reloads_with_the_same_logprobs(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    p = model.load_policy("tiny", lora_r=4, lora_alpha=8)
    with torch.no_grad():
        for name, w in p.model.named_parameters():
            if "lora_B" in name:
                w.normal_(0, 0.05)  # a trained adapter, not the zero init
    ckpt = tmp_path / "ckpt"
    train.save_checkpoint(str(ckpt), p, None, train.Config(model="tiny"), dict(step=1))
    model.export(str(ckpt), str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "adapter" / "adapter_model.safetensors").exists()
    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    plain = model.Policy(merged, p.tokenizer, "merged")
    (ep,) = rollout(p, data.synthetic(1, seed=3), RolloutConfig(group_size=1, max_turn_tokens=12,
                                                                  max_response_tokens=12, global_tokens=16))
    batch = train.collate(p, [ep])
    with torch.no_grad():
        a = model.sequence_logprobs(p, batch)
        b = model.sequence_logprobs(plain, batch)
        with p.reference():
            base = model.sequence_logprobs(p, batch)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert (a - base).abs().max() > 1e-3  # the adapter mattered
