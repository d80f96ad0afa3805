"""The real checkpoint path, on a tiny folder laid out like the Hub download of Qwen2.5-VL-7B-Instruct
(tests/hub_fixture.py): loading and checking it, paths, shapes from config.json, the export."""
import dataclasses
import io
import json
import os
import shutil
import time

import pytest
import torch

import hub_fixture
import model
import snapshot
import train
from helpers import linked_copy, logprobs_three_ways, move_lora

QWEN_7B = dict(hub_fixture.CONFIG, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
               num_hidden_layers=28, num_key_value_heads=4, max_window_layers=28,
               rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
               vision_config=dict(hub_fixture.CONFIG["vision_config"], depth=32, hidden_size=1280,
                                  intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                                  fullatt_block_indexes=[7, 15, 23, 31]))
QWEN_3B = dict(QWEN_7B, hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_hidden_layers=36,
               num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936,
               vision_config=dict(QWEN_7B["vision_config"], out_hidden_size=2048))
QWEN_32B = dict(QWEN_7B, hidden_size=5120, intermediate_size=27648, num_attention_heads=40, num_hidden_layers=64,
                num_key_value_heads=8, vision_config=dict(QWEN_7B["vision_config"], out_hidden_size=5120))
QWEN_72B = dict(QWEN_7B, hidden_size=8192, intermediate_size=29568, num_attention_heads=64, num_hidden_layers=80,
                num_key_value_heads=8, vision_config=dict(QWEN_7B["vision_config"], out_hidden_size=8192))


def _with_config(folder, dst, config):
    """A linked copy of a model folder with another config.json."""
    linked_copy(folder, dst)
    os.remove(os.path.join(dst, "config.json"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return str(dst)


def test_hub_layout_loads_with_qwen_ids_and_the_official_template(hub_model, tmp_path):
    p = model.load_policy(hub_model, precision="fp32", lora=False)
    assert (p.im_start, p.im_end, p.vision_start, p.vision_end, p.image_pad, p.tool_call_end, p.pad) == (
        151644, 151645, 151652, 151653, 151655, 151658, 151643)
    assert len(p.tokenizer) == 151665 and p.head.weight.shape[0] == 152064
    assert set(range(151665, 152064)) <= set(p.banned)  # ids without a token are never sampled
    assert model.check_template(p, hub_model) is None  # the project's prompt is Qwen's, token for token
    off = linked_copy(hub_model, tmp_path / "off")
    os.remove(os.path.join(off, "chat_template.json"))
    role = "<|im_start|>{{ message['role'] }}"
    template = hub_fixture.CHAT_TEMPLATE.replace(role + "\n", role + ":\n")
    with open(os.path.join(off, "chat_template.json"), "w") as f:
        json.dump({"chat_template": template}, f)
    warning = model.check_template(p, off)
    at = len(p.encode("<|im_start|>system"))  # the first token after the role
    assert warning.startswith(f"warning: {off}'s chat template") and f"from token {at} on" in warning
    # a text-only template (Qwen2.5's, which adds a message's content to a string) cannot take an image part: a
    # warning, not a crash after the weights have loaded
    with open(os.path.join(off, "chat_template.json"), "w") as f:
        json.dump({"chat_template": "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
                                    "message['content'] + '<|im_end|>' }}{% endfor %}"}, f)
    warning = model.check_template(p, off)
    assert warning.startswith(f"warning: {off}'s chat template cannot render a prompt with an image (TypeError")


def _break(folder, name, how):
    """Replace a file of a linked copy: how is None (remove it), bytes (its new content) or a config dict."""
    path = os.path.join(folder, name)
    target = os.path.realpath(path)
    os.remove(path)
    if isinstance(how, dict):
        with open(path, "w") as f:
            json.dump(how, f)
    elif how is not None:
        with open(target, "rb") as src, open(path, "wb") as f:
            f.write(src.read()[:how])


@pytest.mark.parametrize("files, how, message", [
    (["model-00002-of-00002.safetensors"], None,
     "model-00002-of-00002.safetensors is missing (listed in model.safetensors.index.json)"),
    (["model-00001-of-00002.safetensors"], 100_000, "model-00001-of-00002.safetensors is truncated: 100,000 bytes"),
    (["tokenizer.json", "vocab.json", "merges.txt"], None, "has no tokenizer (tokenizer.json, or vocab.json"),
    (["tokenizer.json"], None, "vocab.json: <|image_pad|> is id 151655, but config.json says image_token_id = 151654"),
    (["config.json"], None, "config.json is missing"),
    # cut-off JSON files: one line naming the file, before any weight loads
    (["tokenizer.json"], 1000, "tokenizer.json: the tokenizer does not load"),
    (["model.safetensors.index.json"], 100, "model.safetensors.index.json is not valid JSON"),
    (["chat_template.json"], 50, "chat_template.json is not valid JSON"),
])
def test_a_broken_download_is_one_line_naming_the_file(hub_model, tmp_path, files, how, message):
    broken = linked_copy(hub_model, tmp_path / "m")
    for name in files:
        _break(broken, name, how)
    if "151654" in message:  # a config from another model: its image id disagrees with the tokenizer
        _break(broken, "config.json", dict(hub_fixture.CONFIG, image_token_id=151654))
    with pytest.raises(SystemExit) as e:
        snapshot.check(broken)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_token_ids_are_read_where_transformers_reads_them(hub_model, tmp_path):
    """A transformers 4.5x config repeats the language model's keys under text_config with image_token_id null;
    transformers takes the top level's id, and so must the check."""
    broken = linked_copy(hub_model, tmp_path / "m")
    text = {k: hub_fixture.CONFIG[k] for k in ("hidden_size", "vocab_size")}
    _break(broken, "config.json", dict(hub_fixture.CONFIG, image_token_id=151654,
                                       text_config=dict(text, image_token_id=None)))
    with pytest.raises(SystemExit, match="image_token_id = 151654"):
        snapshot.check(broken)


def test_paths_are_paths_and_an_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    os.mkdir("ckpt")
    for name in ["./nope", "~/no-such-lfpc-model", "ckpt/qwen25vl7b", "qwen_local", "a/b/c"]:
        with pytest.raises(SystemExit, match=r"^error: no such folder: /"):
            snapshot.resolve(name)
    os.mkdir("ckpt/qwen25vl7b")
    assert snapshot.resolve("ckpt/qwen25vl7b") == str(tmp_path / "ckpt" / "qwen25vl7b")  # absolute
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        snapshot.resolve("Qwen/Qwen2.5-VL-7B-Instruct")
    assert time.time() - t0 < 10
    assert "cannot reach http://127.0.0.1:9" in str(e.value)
    assert "hf download Qwen/Qwen2.5-VL-7B-Instruct --local-dir DIR" in str(e.value) and "--model DIR" in str(e.value)
    for var in ("no_proxy", "NO_PROXY", "http_proxy", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.2:7")  # behind a proxy, the proxy is what must answer
    with pytest.raises(SystemExit, match=r"cannot reach http://127.0.0.1:9 through the proxy http://127.0.0.2:7"):
        snapshot.resolve("Qwen/Qwen2.5-VL-7B-Instruct")
    assert snapshot._first_hop("https://huggingface.co") == ("huggingface.co", 443, None)  # HTTPS: no proxy set
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert snapshot._first_hop("http://127.0.0.1:9") == ("127.0.0.1", 9, None)
    monkeypatch.delenv("HTTP_PROXY")
    with pytest.raises(SystemExit) as e:  # --dry-run: nothing is downloaded
        snapshot.resolve("Qwen/Qwen2.5-VL-7B-Instruct", download=False)
    assert f"is not downloaded. No folder {tmp_path}/Qwen/Qwen2.5-VL-7B-Instruct either" in str(e.value)


def test_a_partly_cached_hub_id_downloads_the_rest(hub_model, tmp_path, monkeypatch):
    """A Hub download cut short leaves a snapshot in the cache with some of its files: resolving the id resumes
    the download rather than returning the partial folder, whose load would fail; a whole one is used as is."""
    import huggingface_hub
    from huggingface_hub import constants

    partial = tmp_path / "snapshot"
    shutil.copytree(hub_model, partial)
    calls = []

    def snapshot_download(name, local_files_only=False):
        calls.append(local_files_only)
        if not local_files_only:  # the Hub client fetches what the snapshot lacks
            shutil.copytree(hub_model, partial, dirs_exist_ok=True)
        return str(partial)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(snapshot.socket, "create_connection", lambda *a, **k: io.BytesIO())  # the Hub answers
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert snapshot.resolve("Qwen/Qwen2.5-VL-7B-Instruct") == str(partial) and calls == [True]  # whole: as is
    for missing in [snapshot.shards(partial)[:1], ["config.json"], ["tokenizer.json", "vocab.json"],
                    ["tokenizer.json", "merges.txt"]]:
        for name in missing:
            os.remove(partial / name)
        calls.clear()
        assert snapshot.resolve("Qwen/Qwen2.5-VL-7B-Instruct") == str(partial) and calls == [True, False]
        assert all(os.path.isfile(partial / name) for name in missing)
    (partial / snapshot.INDEX).write_text("{not json")  # damage, not a missing file: check() says which
    calls.clear()
    assert snapshot.resolve("Qwen/Qwen2.5-VL-7B-Instruct") == str(partial) and calls == [True]
    with pytest.raises(SystemExit, match="model.safetensors.index.json is not valid JSON"):
        snapshot.check(str(partial))
    shutil.copy(os.path.join(hub_model, snapshot.INDEX), partial / snapshot.INDEX)
    os.remove(partial / "config.json")
    calls.clear()  # --dry-run downloads nothing: the partial folder, whose check names the missing file
    assert snapshot.resolve("Qwen/Qwen2.5-VL-7B-Instruct", download=False) == str(partial) and calls == [True]
    with pytest.raises(SystemExit, match="config.json is missing"):
        snapshot.check(str(partial))


def test_memory_estimate_reads_the_config_of_any_size(tmp_path):
    sizes = {}
    for name, config in [("mymodel", QWEN_7B), ("small", QWEN_3B), ("medium", QWEN_32B), ("big", QWEN_72B)]:
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        sizes[name] = model.estimate_memory(train.Config(model=str(tmp_path / name),
                                                         **{**train.PRESETS["24gb"], "rollout_rows": 16}))
    est = sizes["mymodel"]  # a 7B in a folder without "7b" in its name
    # language-model linears: 28 layers x (2*3584^2 + 2*3584*512 + 3*3584*18944) = 6,525,288,448 parameters in NF4
    # (0.5 bytes + 0.127 bits of double-quantised constants); embeddings and head 2 x 152,064 x 3,584 bf16;
    # the vision tower in bf16
    vision = snapshot.vision_params(QWEN_7B)
    assert vision == pytest.approx(676e6, rel=0.01)  # Qwen2.5-VL-7B's published vision tower
    weights = 6_525_288_448 * (0.5 + 0.127 / 8) + 2 * 152_064 * 3_584 * 2 + vision * 2
    assert est["weights"] == pytest.approx(weights / 1e9) and 6.8 < est["weights"] < 7.0
    # KV cache: 16 rows x (400 + 1,024 + 2,048) tokens x 28 layers x K,V x 4 heads x 128 x 2 bytes = 57,344 B/token
    assert est["kv_cache"] == pytest.approx(16 * 3472 * 57_344 / 1e9)
    # decode.py's static cache beside it: the same rows, the columns in whole steps of 256 (3,584)
    assert est["static_kv_cache"] == pytest.approx(16 * 3584 * 57_344 / 1e9)
    # LoRA r=16: per layer 16 x (2*3584 + 2*3584 + 2*(3584+512) + 3*(3584+18944)) parameters, 16 bytes each
    assert est["lora_and_optimizer"] == pytest.approx(28 * 16 * (4 * 3584 + 2 * 4096 + 3 * 22528) * 16 / 1e9)
    assert est["peak"] < 24
    weights = [sizes[n]["weights"] for n in ("small", "mymodel", "medium", "big")]
    assert weights == sorted(weights) and 35 < weights[-1] < 45  # 72B in NF4: about 40 GB
    # rollout_rows=0 (the presets): the most rows, in whole groups, that keep the peak within 90% of the card
    cfg = train.Config(model=str(tmp_path / "mymodel"), **{**train.PRESETS["24gb"], "prompts_per_step": 64})
    rows = train.size_rollout_rows(cfg)
    peak = lambda n: model.estimate_memory(dataclasses.replace(cfg, rollout_rows=n))["peak"]
    assert rows == cfg.rollout_rows and rows % 8 == 0 and peak(rows) <= 21.6 < peak(rows + 8)
    assert train.size_rollout_rows(dataclasses.replace(cfg, rollout_rows=0, decode="dynamic")) > rows  # one KV cache
    bf16 = model.estimate_memory(train.Config(model=str(tmp_path / "mymodel"), base_precision="bf16"))
    assert bf16["weights"] == pytest.approx((6_525_288_448 * 2 + 2 * 152_064 * 3_584 * 2 + vision * 2) / 1e9)


def test_dry_run_reads_and_checks_the_folder_and_refuses_what_does_not_fit(hub_model, tmp_path, capsys):
    folder = _with_config(hub_model, tmp_path / "mymodel", QWEN_7B)
    cfg = train.main(["--preset", "24gb", "--model", folder, "--dry-run"])
    out = capsys.readouterr().out
    assert f"shapes from {folder}/config.json" in out and f"checked {folder}" in out
    assert float(out.split("peak ")[-1].split()[0]) < 24 and cfg.model == folder
    with pytest.raises(SystemExit, match="exceeds memory_gb=24"):
        train.main(["--preset", "24gb", "--model", folder, "--dry-run", "--gradient_checkpointing=false"])
    assert train.main(["--preset", "24gb", "--model", folder, "--dry-run", "--gradient_checkpointing=false",
                       "--ignore_memory_estimate=true"])
    with pytest.raises(SystemExit, match="no such folder"):
        train.main(["--preset", "24gb", "--model", str(tmp_path / "mymodle"), "--dry-run"])
    os.remove(os.path.join(folder, "model-00001-of-00002.safetensors"))
    with pytest.raises(SystemExit, match="model-00001-of-00002.safetensors is missing"):
        train.main(["--preset", "24gb", "--model", folder, "--dry-run"])


def test_export_loads_anywhere_the_base_loads(hub_model, tmp_path):
    import importlib.util

    from safetensors import safe_open
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    p = model.load_policy(hub_model, precision="fp32", lora_r=4, lora_alpha=8)
    torch.manual_seed(0)  # the adapter's effect must not depend on the tests that ran before
    move_lora(p, std=0.2)
    train.save_checkpoint(str(tmp_path / "ckpt"), p, None, train.Config(model=hub_model), dict(step=1))
    out = str(tmp_path / "merged")
    model.export(str(tmp_path / "ckpt"), out)
    assert set(os.listdir(hub_model)) | {"adapter"} == set(os.listdir(out))
    for name in ("config.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json"):
        assert open(os.path.join(out, name)).read() == open(os.path.join(hub_model, name)).read()
    for shard in snapshot.shards(hub_model):  # the base's names, shards and dtype
        with safe_open(os.path.join(hub_model, shard), "pt") as a, safe_open(os.path.join(out, shard), "pt") as b:
            assert set(a.keys()) == set(b.keys()) and all(b.get_tensor(k).dtype == torch.bfloat16 for k in b.keys())
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|image_pad|>") == 151655
    assert AutoImageProcessor.from_pretrained(out).patch_size == 14
    if importlib.util.find_spec("torchvision"):  # Qwen's video processor, part of AutoProcessor, needs it
        assert AutoProcessor.from_pretrained(out).tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    a, b, base = logprobs_three_ways(p, AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval())
    assert (a - base).abs().max() > 0.05  # the adapter matters ...
    assert (a - b).abs().max() < 0.1 * (a - base).abs().max()  # ... and the export keeps it (bf16 rounding aside)


def _small_set(folder):
    """A two-item JSONL set with small images and boxes: the data path of a real run, at the cost of a toy."""
    from PIL import Image

    os.makedirs(folder / "imgs")
    rows = []
    for i, color in enumerate(["red", "blue"]):
        Image.new("RGB", (320, 240), color).save(folder / "imgs" / f"{i}.png")
        rows.append(dict(id=str(i), image=f"imgs/{i}.png", question="What color is it?", answer=color,
                         boxes=[[10, 10, 90, 60], [0, 0, 160, 120]]))
    (folder / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder / "set.jsonl")


def test_commands_run_on_a_hub_layout_folder_named_by_a_relative_path(hub_model, tmp_path, monkeypatch):
    """train.py stage 1 (QLoRA: NF4 + LoRA) and stage 2, infogap.py, eval.py with and without the adapter,
    and model.py export from another folder, through their command lines."""
    import sys

    import eval as ev
    import infogap

    dataset = _small_set(tmp_path / "data")
    monkeypatch.chdir(os.path.dirname(hub_model))
    rel = "./" + os.path.basename(hub_model)
    small = ["--data", dataset, "--prompts_per_step=1", "--group_size=2", "--max_turn_tokens=4",
             "--max_response_tokens=8", "--global_tokens=16", "--crop_tokens=16", "--curves=false"]
    levels = tmp_path / "levels.jsonl"
    monkeypatch.setattr(sys, "argv", ["infogap.py", "--model", rel, "--data", dataset, "--ladder", "64,16",
                                      "--max-tokens", "4", "--out", str(levels)])
    infogap.main()
    assert len(open(levels).readlines()) == 2
    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    train.main(["--stage", "1", "--model", rel, "--base_precision=nf4", f"--out_dir={s1}", "--steps=2",
                f"--infogap={levels}", *small])
    assert json.load(open(s1 / "final" / "config.json"))["model"] == hub_model  # absolute, not "./..."
    assert json.load(open(s1 / "final" / "adapter_config.json"))["base_model_name_or_path"] == hub_model
    assert len(open(s1 / "metrics.jsonl").readlines()) == 2
    train.main(["--stage", "2", "--model", rel, "--base_precision=fp32", f"--init_adapter={s1 / 'final'}",
                f"--out_dir={s2}", "--steps=1", *small])
    assert os.path.isfile(s2 / "final" / "adapter_model.safetensors")
    budgets = ["--global-tokens", "16", "--crop-tokens", "16", "--max-turn-tokens", "4", "--max-response-tokens", "4"]
    for name, adapter in [("plain", []), ("tuned", ["--adapter", str(s2 / "final")])]:
        ev.main(["--bench", "synthetic", "--data", dataset, "--model", rel, *budgets, *adapter, "--limit", "1",
                 "--out", str(tmp_path / name)])
        assert len(open(tmp_path / name / "items.jsonl").readlines()) == 1
    monkeypatch.chdir(tmp_path)  # the adapter says where its base is, from anywhere
    monkeypatch.setattr(sys, "argv", ["model.py", "export", "--adapter", str(s2 / "final"), "--out", "merged"])
    model.main()
    assert set(os.listdir(hub_model)) | {"adapter"} == set(os.listdir(tmp_path / "merged"))


def test_a_shard_that_is_no_safetensors_file_is_one_line(hub_model, tmp_path):
    """A git-lfs pointer or an error page saved as a shard: one line at the check, before any weight loads."""
    broken = linked_copy(hub_model, tmp_path / "m")
    path = os.path.join(broken, "model-00001-of-00002.safetensors")
    os.remove(path)
    with open(path, "w") as f:
        f.write("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4000000000\n")
    with pytest.raises(SystemExit) as e:
        snapshot.check(broken)
    assert f"{path} is not a safetensors file" in str(e.value) and "\n" not in str(e.value)


def test_export_refuses_an_adapter_it_cannot_merge_before_writing_anything(hub_model, tmp_path):
    """DoRA would merge as plain LoRA, an unknown module would be dropped: refused before out/ exists."""
    from safetensors.torch import save_file
    adapter, out = tmp_path / "adapter", tmp_path / "out"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(dict(r=4, lora_alpha=8, use_dora=True)))
    with pytest.raises(SystemExit, match="DoRA and per-layer ranks are not supported here"):
        snapshot.merge(hub_model, str(adapter), str(out))
    (adapter / "adapter_config.json").write_text(json.dumps(dict(r=4, lora_alpha=8)))
    module = "base_model.model.model.layers.0.self_attn.nope"
    save_file({f"{module}.lora_A.weight": torch.zeros(4, 8), f"{module}.lora_B.weight": torch.zeros(8, 4)},
              str(adapter / "adapter_model.safetensors"))
    with pytest.raises(SystemExit, match="changes model.layers.0.self_attn.nope, which the base model does not have"):
        snapshot.merge(hub_model, str(adapter), str(out))
    assert not out.exists()


def test_export_of_a_missing_adapter_folder_names_it_as_missing(tmp_path):
    """A mistyped --adapter is named as no adapter, not as "pass --model" (which leads to this message next)."""
    with pytest.raises(SystemExit, match="holds no adapter_config.json"):
        model.export(str(tmp_path / "runs" / "stage2" / "fnal"), str(tmp_path / "out"))


def test_an_adapter_without_a_usable_record_of_its_files_passes_the_check(tmp_path):
    """Another tool's or an older run's adapter: no sums to check against, so it loads, not a traceback."""
    snapshot.check_adapter(str(tmp_path))
    for state in ("[2]", "{cut", json.dumps(dict(step=2, sha256=["x"])), json.dumps(dict(sha256={"rng.pt": "0"}))):
        (tmp_path / "state.json").write_text(state)
        snapshot.check_adapter(str(tmp_path))
