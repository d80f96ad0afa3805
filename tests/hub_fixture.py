"""A tiny model folder laid out like the Hub download of Qwen/Qwen2.5-VL-7B-Instruct, built offline.

What is real: the file names, config.json in the Hub's (transformers 4) layout with its keys, the 22 added
tokens at their real ids (151643-151664) in a 151,665-token vocabulary, the official chat template, the
processor and generation configs, and bf16 weights under the legacy tensor names (model.layers.*, visual.*)
in several shards with an index. What is tiny: the sizes (hidden 32, 2 layers, a 2-block vision tower) and
the BPE merges, learnt here from the project's prompt.
"""
import json
import os

import torch

import model as project_model

QWEN_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
              "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
              "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
              "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
FIRST_ADDED = 151643  # the real vocabulary has 151,643 BPE tokens, then the added ones
NUM_SPECIAL = 14  # the first 14 added tokens are special; <tool_call> and the rest are not

# Qwen2-VL / Qwen2.5-VL's chat_template.json
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")

# config.json as the Hub has it (transformers 4.41 layout), at tiny sizes
CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 128000,
    "max_window_layers": 2, "model_type": "qwen2_5_vl", "num_attention_heads": 2, "num_hidden_layers": 2,
    "num_key_value_heads": 1, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 2, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                      "in_chans": 3, "out_hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2,
                      "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [1],
                      "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "vocab_size": 152064}

PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor"}

GENERATION = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
              "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
              "transformers_version": "4.49.0.dev0"}

# Qwen2's pre-tokenizer split
PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _write_json(folder, name, obj, indent=2):
    with open(os.path.join(folder, name), "w") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)


def _tokenizer_files(folder):
    """tokenizer.json, vocab.json, merges.txt and tokenizer_config.json with Qwen's added tokens at their ids.
    The learnt BPE is a few hundred tokens; unused filler tokens pad the vocabulary to Qwen's size."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [project_model.DEEPEYES_SYSTEM, project_model.DEEPEYES_USER, "What is it? <answer>B</answer> 0123456789"]
    tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(vocab_size=500, show_progress=False,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), FIRST_ADDED)})
    spec["added_tokens"] = [dict(id=FIRST_ADDED + i, content=t, single_word=False, lstrip=False, rstrip=False,
                                 normalized=False, special=i < NUM_SPECIAL) for i, t in enumerate(QWEN_ADDED)]
    _write_json(folder, "tokenizer.json", spec, indent=None)  # 151,643 entries: compact is much faster
    _write_json(folder, "vocab.json", vocab, indent=None)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in spec["model"]["merges"]))
    decoder = {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
               for a in spec["added_tokens"]}
    _write_json(folder, "tokenizer_config.json", dict(
        add_bos_token=False, add_prefix_space=False, added_tokens_decoder=decoder,
        additional_special_tokens=QWEN_ADDED[1:NUM_SPECIAL], bos_token=None, clean_up_tokenization_spaces=False,
        eos_token="<|im_end|>", errors="replace", model_max_length=131072, pad_token="<|endoftext|>",
        split_special_tokens=False, tokenizer_class="Qwen2Tokenizer", unk_token=None))


def build(folder, seed=0):
    """Write the fixture to `folder` (about 20 MB, a few seconds) and return it."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    os.makedirs(folder, exist_ok=True)
    _write_json(folder, "config.json", CONFIG)
    config = AutoConfig.from_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    net.save_pretrained(folder, max_shard_size="10MB")  # legacy tensor names; 2 shards and an index
    _write_json(folder, "config.json", CONFIG)  # save_pretrained wrote transformers 5's layout: put the Hub's back
    _write_json(folder, "generation_config.json", GENERATION)
    _write_json(folder, "preprocessor_config.json", PREPROCESSOR)
    _write_json(folder, "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    _tokenizer_files(folder)
    return folder
