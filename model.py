"""The policy: Qwen2.5-VL in 4-bit NF4 with LoRA on the language model, or `tiny` (built offline, seeded).

Holds the chat template (we expand image pads ourselves: no processor class, no torchvision), Qwen's 3-D
rotary positions, the forward pass to hidden states, and `sequence_logprobs`, which gets token log-probs
from hidden states through `kernels.selective_logprobs` (never the full logits). The reference policy is the
same model with its adapters disabled, so there is no second copy in memory.

    python -c "import model; p = model.load_policy('tiny'); print(p.model)"
    python model.py export --adapter runs/stage2/final --out merged/     # the base's own layout, adapter merged
"""
import contextlib
import json
import logging
import os
import tempfile
import warnings

import torch

import decode
import kernels
import snapshot

# bitsandbytes' CPU backend warns on import when an optional kernel hub package is missing; it falls back.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # PEFT calls a renamed transformers API

# ---------------------------------------------------------------- prompts: --prompt deepeyes | qwen | micro

# DeepEyes' wording, which DeepEyes-7B was trained with and LFPC starts from. Source: github.com/Visual-Agent/DeepEyes
# at 6c5e796: SYSTEM_PROMPT_V2 and USER_PROMPT_V2 in verl/workers/agent/envs/mm_process_engine/prompt.py; the
# user turn "Question: ...\nOptions: \nA. ...\n" + USER_PROMPT_V2 in eval/eval_vstar.py; the tool's reply
# "<tool_response><image>" + USER_PROMPT_V2 + "</tool_response>" and the error turn "Error: ..." in
# verl/workers/agent/envs/mm_process_engine/visual_toolbox_v2.py. (Its schema says "required": ["bbox"] while the
# property is bbox_2d: kept as written, since that is what the checkpoints saw.)
# Both system prompts declare the tool in Qwen's layout: a <tools> block with the schema, then the call format.
TOOLS = "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{schema}\n</tools>"
CALL_FORMAT = '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'

DEEPEYES_SYSTEM = (
    "You are a helpful assistant.\n\n# Tools\nYou may call one or more functions to assist with the user query.\n"
    + TOOLS.format(schema='{"type":"function","function":{"name":"image_zoom_in_tool","description":"Zoom in on a specific region of an image by cropping it based on a bounding box (bbox) and an optional object label.","parameters":{"type":"object","properties":{"bbox_2d":{"type":"array","items":{"type":"number"},"minItems":4,"maxItems":4,"description":"The bounding box of the region to zoom in, as [x1, y1, x2, y2], where (x1, y1) is the top-left corner and (x2, y2) is the bottom-right corner."},"label":{"type":"string","description":"The name or label of the object in the specified bounding box (optional)."}},"required":["bbox"]}}}')
    + "\n\n# How to call a tool\nReturn a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n" + CALL_FORMAT + "\n\n**Example**:  \n<tool_call>  \n"
    '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 100, 200], "label": "the apple on the desk"}}  '
    "\n</tool_call>")
DEEPEYES_USER = ("\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  "
                 "<think>...</think>  <tool_call>...</tool_call> (if tools needed)  <answer>...</answer> ")
# without the tool (the no-tool probe, the information-gap selection): DeepEyes has no such prompt [choice]
DEEPEYES_USER_NO_TOOL = "\nThink first, then answer. Format strictly as:  <think>...</think>  <answer>...</answer> "

# The project's own wording (Qwen's tool-calling layout), for models trained with it.
QWEN_SYSTEM = (
    "You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    + TOOLS.format(schema='{"type": "function", "function": {"name": "image_zoom_in_tool", "description": "Zoom in on a region of the image by cropping it with a bounding box and return the crop at high resolution.", "parameters": {"type": "object", "properties": {"bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4, "description": "The region to zoom in on, as [x1, y1, x2, y2]: top-left and bottom-right corners, in pixels of the image you were shown."}, "label": {"type": "string", "description": "The name of the object in the box (optional)."}}, "required": ["bbox_2d"]}}}')
    + "\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n" + CALL_FORMAT)
QWEN_USER = ("\nThink first inside <think></think>. If a detail is too small to see, call image_zoom_in_tool on "
             "its region. Put the final answer inside <answer></answer>.")
QWEN_USER_NO_TOOL = "\nThink first inside <think></think>. Put the final answer inside <answer></answer>."
PLAIN_SYSTEM = "You are a helpful assistant."
# The micro model's wording: Qwen's layout with the tool schema cut to one example call [choice]. The full schema
# is ~450 tokens that a model trained from scratch does not need, and on a CPU each prompt token costs time in
# every rollout and every loss; the user turn is the qwen wording's, the tool reply too but without its newlines
# (the layout the committed warm start was trained with).
MICRO_SYSTEM = ('You are a helpful assistant. To zoom in, call image_zoom_in_tool: <tool_call>{"name": '
                '"image_zoom_in_tool", "arguments": {"bbox_2d": [x1, y1, x2, y2]}}</tool_call>')
MICRO_USER = "\nZoom in if it is too small. Answer inside <answer></answer>."
MICRO_USER_NO_TOOL = "\nAnswer inside <answer></answer>."
PROMPTS = ("deepeyes", "qwen", "micro")
SYSTEMS = dict(deepeyes=DEEPEYES_SYSTEM, qwen=QWEN_SYSTEM, micro=MICRO_SYSTEM)


def _check_prompt(prompt):
    if prompt not in PROMPTS:
        raise ValueError(f"prompt {prompt!r}: expected one of {', '.join(PROMPTS)}")


def user_text(question, options=None, prompt="deepeyes", tools=True):
    """The user turn's text after the image: the question, its lettered options, the instructions."""
    _check_prompt(prompt)
    letters = "ABCDE"
    if prompt == "deepeyes":
        text = f"Question: {question}\n"
        if options:  # eval_vstar.py: "Options: {options}\n" with options "\nA. ...\nB. ...\n", then USER_PROMPT_V2
            text += "Options: \n" + "".join(f"{letters[i]}. {o}\n" for i, o in enumerate(options)) + "\n"
        return text + (DEEPEYES_USER if tools else DEEPEYES_USER_NO_TOOL)
    if options:
        question += "\n" + "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
        question += "" if prompt == "micro" else "\nAnswer with the option's letter."
    if prompt == "micro":
        return question + (MICRO_USER if tools else MICRO_USER_NO_TOOL)
    return question + (QWEN_USER if tools else QWEN_USER_NO_TOOL)


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]  # added (non-special) tokens in Qwen's vocabulary too

# Qwen's chat template, without tools or video: kept with the tiny tokenizer so exported models chat as usual.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class Policy:
    """A loaded model with its tokenizer and the token ids the rollout needs."""

    def __init__(self, model, tokenizer):
        self.model = model  # a PeftModel (LoRA) or a plain Qwen2_5_VLForConditionalGeneration
        self.tokenizer = tokenizer
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.lm = hf.model  # Qwen2_5_VLModel: vision tower + language model (LoRA layers injected in place)
        self.head = hf.lm_head
        tok = tokenizer.convert_tokens_to_ids
        self.im_start, self.im_end = tok("<|im_start|>"), tok("<|im_end|>")
        self.vision_start, self.vision_end = tok("<|vision_start|>"), tok("<|vision_end|>")
        self.image_pad = tok("<|image_pad|>")
        self.tool_call_end = tok("</tool_call>")
        self.end_of_text = tok("<|endoftext|>")  # Qwen's other end-of-generation token (generation_config)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tok("<|endoftext|>")
        self.merge = hf.config.vision_config.spatial_merge_size
        # tokens only the harness writes: sampling one would break the image-pad / image count; and the head's
        # rows past the tokenizer (Qwen2.5-VL-7B: 152,064 rows, 151,665 tokens), which decode to nothing. Not when
        # they are most of the head: tiny-7b (random weights at the 7B's shape, the tiny tokenizer) would then draw
        # from a few hundred ids, end tokens among them, and its benchmark rows would end early
        rows = self.head.weight.shape[0]
        past = list(range(len(tokenizer), rows)) if rows - len(tokenizer) < rows // 100 else []
        self.banned = [tok(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                        "<|video_pad|>")] + past

    @property
    def device(self):
        return self.head.weight.device

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False)

    def image_block(self, grid):
        """Token ids of one image: vision_start, t*h*w/merge^2 image pads, vision_end."""
        n = int(grid[0] * grid[1] * grid[2]) // self.merge ** 2
        return [self.vision_start] + [self.image_pad] * n + [self.vision_end]

    def prompt_ids(self, text, grid, tools=True, prompt="deepeyes"):
        """System + user turn (the global image, then `text`, from user_text) + the opening of the assistant
        turn. tools=False: the system prompt declares no tool (the no-tool probe, the info-gap selection)."""
        _check_prompt(prompt)
        system = PLAIN_SYSTEM if not tools else SYSTEMS[prompt]
        head = self.encode(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
        tail = self.encode(f"{text}<|im_end|>\n<|im_start|>assistant\n")
        return head + self.image_block(grid) + tail

    def tool_turn_ids(self, closed, grid=None, error=None, prompt="deepeyes"):
        """The tool's reply as a user turn: the crop (grid) or an `Error: ...` text, then a new assistant
        turn. `closed`: the assistant turn already ended with <|im_end|> (else we close it here)."""
        _check_prompt(prompt)
        ids = self.encode("\n" if closed else "<|im_end|>\n")  # the chat template's newline after <|im_end|>
        ids += self.encode("<|im_start|>user\n")
        # Qwen2.5's chat template puts a tool message on lines of its own; DeepEyes and the micro warm start do not
        nl = "\n" if prompt == "qwen" else ""
        if error is not None:  # DeepEyes answers a bad call with bare "Error: ..." text
            ids += self.encode(f"Error: {error}" if prompt == "deepeyes" else
                               f"<tool_response>{nl}Error: {error}{nl}</tool_response>")
        else:
            ids += self.encode(f"<tool_response>{nl}") + self.image_block(grid)
            ids += self.encode((DEEPEYES_USER if prompt == "deepeyes" else nl) + "</tool_response>")
        return ids + self.encode("<|im_end|>\n<|im_start|>assistant\n")

    def forward_hidden(self, ids, attention_mask, position_ids, pixel_values=None, grid_thw=None, cache=None):
        """Last hidden states (B, T, D) of the language model (no lm_head), and the updated KV cache.
        Images in `pixel_values` fill this call's image pads in order (row-major over the batch)."""
        out = self.lm(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                      pixel_values=pixel_values, image_grid_thw=grid_thw, cache=cache, use_cache=cache is not None)
        return out.last_hidden_state, out.cache

    @contextlib.contextmanager
    def reference(self):
        """The reference policy: the same weights with LoRA switched off."""
        if hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield
        else:
            yield

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def save_adapter(self, path):
        self.model.save_pretrained(path)


def rope_positions(ids, grids, image_pad, start=0, merge=2):
    """Qwen2.5-VL's 3-D rotary positions for a chunk of token ids that continues a row at `start`.

    Text: all three axes = a running counter. An image (a run of image pads, grids in order) at counter s:
    (s, s + row, s + col) over its merged grid; the counter then continues at s + max(rows, cols).
    Returns positions long (3, len(ids)) and the counter after the chunk."""
    pos = torch.empty(3, len(ids), dtype=torch.long)
    grids = iter(grids)
    i, s = 0, start
    while i < len(ids):
        if ids[i] != image_pad:
            pos[:, i] = s
            i, s = i + 1, s + 1
            continue
        _, gh, gw = (int(v) for v in next(grids))
        gh, gw = gh // merge, gw // merge
        rows = torch.arange(gh).repeat_interleave(gw)
        cols = torch.arange(gw).repeat(gh)
        pos[0, i:i + gh * gw] = s
        pos[1, i:i + gh * gw] = s + rows
        pos[2, i:i + gh * gw] = s + cols
        i, s = i + gh * gw, s + max(gh, gw)
    return pos, s


def pad_right(rows, value):
    """Lists of ints of different lengths -> long (B, L), each row right-padded with `value`."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def pack_rows(policy, rows):
    """Right-pad token rows into one batch. rows: (ids, grids of the images among ids, rotary start) each.
    Returns ids and attention mask (B, L) (a pad has mask 0 and is never attended to), Qwen's 3-D
    positions (3, B, L) and each row's rotary counter after its tokens."""
    ids = pad_right([r[0] for r in rows], policy.pad)
    attn = pad_right([[1] * len(r[0]) for r in rows], 0)
    pos = torch.zeros(3, *ids.shape, dtype=torch.long)
    ends = []
    for b, (row_ids, grids, start) in enumerate(rows):
        pos[:, b, :len(row_ids)], end = rope_positions(row_ids, grids, policy.image_pad, start, policy.merge)
        ends.append(end)
    return ids, attn, pos, ends


def sequence_logprobs(policy, batch, temperature=1.0):
    """Log-probs of the tokens with loss_mask == 1, from hidden states (never the full logits).

    batch: ids (B, T), attention_mask (B, T), position_ids (3, B, T), loss_mask (B, T), pixel_values, grid_thw.
    Returns logp (N,) in row-major order of the loss-mask positions."""
    hidden, _ = policy.forward_hidden(batch["ids"], batch["attention_mask"], batch["position_ids"],
                                      batch["pixel_values"], batch["grid_thw"])  # (B, T, D)
    predicts = batch["loss_mask"][:, 1:].bool()  # hidden at t predicts token t + 1
    h = hidden[:, :-1][predicts]  # (N, D)
    targets = batch["ids"][:, 1:][predicts]  # (N,)
    return kernels.selective_logprobs(h, policy.head.weight, targets, temperature)


# ---------------------------------------------------------------- loading

def build_tiny_tokenizer():
    """A byte-level BPE tokenizer with Qwen's special tokens, trained here from a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = ("what which where is the word written in small box letter color shape circle square triangle "
             "cross star answer think zoom region image tool call bbox label A B C D yes no left right top "
             "bottom red green blue black white").split()
    # the project's own wording: the tiny model's vocabulary (and so its random weights) is fixed by this corpus
    corpus = [QWEN_SYSTEM, QWEN_USER, " ".join(words),
              '<think>The text is too small, zoom in.</think>',
              '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 300, 400]}}',
              "<answer>B</answer> <tool_response> Error: </tool_response> 0123456789 [], .:;!?'\""]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 4, trainer)
    tok.add_tokens(TOOL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Random-weight shapes: `tiny` is the CPU default; `7b` is Qwen2.5-VL-7B's shape, for timing on a GPU.
SHAPES = {
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, mrope_section=[2, 3, 3],  # sums to head_dim / 2
                           initializer_range=0.1),  # peakier than 0.02, so a LoRA can move its choices quickly
                 vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1])),
    # `micro`: big enough to learn the micro task on a CPU in minutes; its weights are the warm start (warmstart.py)
    "micro": dict(text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, mrope_section=[4, 6, 6]),
                  vision=dict(depth=2, hidden_size=64, intermediate_size=192, num_heads=2, fullatt_block_indexes=[1])),
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, mrope_section=[16, 24, 24], vocab_size=152064),
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           fullatt_block_indexes=[7, 15, 23, 31])),
}


def build_tiny(seed=0, shape="tiny", dtype=torch.float32, device="cpu"):
    """Qwen2.5-VL architecture with seeded random weights and the offline tokenizer; `tiny` is hidden 64 and
    2 layers. shape="7b" (with dtype=torch.bfloat16, device="cuda") builds a 7B-shaped model for benchmarks."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text = dict(SHAPES[shape]["text"])
    mrope = text.pop("mrope_section")
    text.setdefault("vocab_size", len(tokenizer))
    config = Qwen2_5_VLConfig(
        text_config=dict(**text, max_position_embeddings=32768, rope_scaling={"type": "mrope", "mrope_section": mrope},
                         eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
                         bos_token_id=ids("<|endoftext|>")),
        vision_config=dict(**SHAPES[shape]["vision"], out_hidden_size=text["hidden_size"], patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            model = Qwen2_5_VLForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(torch.float32)
    return model.eval(), tokenizer


BUILT_IN = ("tiny", "tiny-7b", "micro")  # built here, no download: tiny and tiny-7b random, micro warm-started
SHAPE_OF = {"tiny": "tiny", "tiny-7b": "7b", "micro": "micro"}
# the micro model's warm-started weights (python warmstart.py writes them; committed, so runs need not)
MICRO_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "micro.safetensors")


def build_builtin(name, seed=0, dtype=torch.float32, device="cpu"):
    """A built-in model by name: tiny and tiny-7b with seeded random weights, micro with its warm start."""
    model, tokenizer = build_tiny(seed, SHAPE_OF[name], dtype, device)
    if name == "micro":
        from safetensors.torch import load_file
        if not os.path.isfile(MICRO_WEIGHTS):
            raise SystemExit(f"error: {MICRO_WEIGHTS} not found: make it with python warmstart.py")
        state = {k: v.to(dtype) for k, v in load_file(MICRO_WEIGHTS, device=str(device)).items()}
        model.load_state_dict(state)
    return model, tokenizer
PRECISIONS = ("auto", "nf4", "bf16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def base_precision(name, precision="auto"):
    """The precision of the base weights: `auto` is nf4 (QLoRA) for a checkpoint, fp32 for `tiny` and `micro`, bf16
    for `tiny-7b`; nf4, bf16 and fp32 are asked for by name, on any device."""
    if precision not in PRECISIONS:
        raise SystemExit(f"error: precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return {"tiny": "fp32", "micro": "fp32", "tiny-7b": "bf16"}.get(name, "nf4")


def locate(name, download=True):
    """A built-in name as is, else the absolute path of the model's folder (snapshot.resolve)."""
    return name if name in BUILT_IN else snapshot.resolve(name, download)


def load_policy(name="tiny", *, adapter=None, lora=True, lora_r=16, lora_alpha=32, precision="auto",
                gradient_checkpointing=False, trainable=True, seed=0, device=None):
    """Load `tiny` or a Qwen2.5-VL checkpoint (hub id or local path) and wrap it with LoRA.

    adapter: a PEFT adapter folder to start from (stage 2 starts from stage 1's). lora=False: the model as
    it is (an external checkpoint such as DeepEyes, for evaluation). precision: of the base weights, see
    base_precision (eval.py --precision and train.py --base_precision pass it)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:  # before the base loads (minutes, for a 7B)
        snapshot.check_adapter(adapter)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = base_precision(name, precision)
    if name in BUILT_IN and precision != "nf4":  # tiny-7b: random weights at 7B's shape (GPU benchmarks)
        model, tokenizer = build_builtin(name, seed, DTYPES[precision], device)
    elif name in BUILT_IN:  # NF4 quantises while loading: the built-in model goes through a folder like any other
        with tempfile.TemporaryDirectory() as folder:
            save_tiny(folder, seed, name)
            model, tokenizer = _load_checkpoint(folder, device, precision)
    else:
        folder = locate(name)
        model, tokenizer = _load_checkpoint(folder, device, precision)
    # what adapters record as their base: the absolute folder; nothing for a built-in model (PEFT would look
    # a name up on the Hub when saving)
    model.name_or_path = "" if name in BUILT_IN else folder
    for p in model.parameters():
        p.requires_grad_(False)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    elif lora:
        cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                         bias="none", init_lora_weights=True)
        model = get_peft_model(model, cfg)
    if gradient_checkpointing:  # after PEFT's wrapper, which would otherwise hook the inputs too
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers makes every input embedding's output require grad (what reentrant checkpoints need): the
        # vision tower's too, which would pull its frozen blocks into every backward. Non-reentrant checkpoints
        # give LoRA its gradients without that (tests/test_fidelity.py)
        base.disable_input_require_grads()
    policy = Policy(model, tokenizer)
    if name not in BUILT_IN:
        check_template(policy, folder)
    return policy


def save_tiny(folder, seed=0, name="tiny"):
    """The built-in model as a checkpoint folder (weights, config, tokenizer, chat template)."""
    model, tokenizer = build_builtin(name, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _load_checkpoint(folder, device, precision):
    """A checkpoint folder, checked first (snapshot.check). nf4: the language model's linear layers in 4-bit
    NF4 (double quant); the vision tower and lm_head stay in the compute dtype: bf16 on CUDA, fp32 on CPU."""
    from transformers import BitsAndBytesConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = snapshot.check(folder)
    dtype = DTYPES.get(precision, torch.bfloat16 if device == "cuda" else torch.float32)
    # transformers 5 matches skipped modules from the start of their names (model.visual.*), 4 anywhere (visual)
    skip = ["visual", "model.visual", "lm_head"]
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip) if precision == "nf4" else None
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, quantization_config=bnb, device_map={"": device}, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load the weights in {folder}: {str(e).splitlines()[0]}") from None
    if bnb is not None:
        _keep_trainable_layout(model)
    return model.eval(), tokenizer


def _keep_trainable_layout(model):
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight into an inference-only layout the first
    time its layer runs in eval mode without gradients (our rollout). That layout has no backward and adds the
    bias in place, so the next update fails ("a view of a leaf Variable ... in-place operation") and no
    gradient reaches the LoRA layers below. Switching the repacking off keeps one layout for both."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def check_template(policy, folder, prompt="deepeyes"):
    """Warn when the snapshot's chat template does not render the project's prompt token for token (the model
    was tuned on its template, so a prompt that departs from it is off-distribution)."""
    template = snapshot.chat_template(folder)
    if template is None:
        return None
    grid = (1, 2 * policy.merge, 2 * policy.merge)  # one image of 4 pads
    question = user_text("What is it?", prompt=prompt)
    system = SYSTEMS[prompt]
    messages = [dict(role="system", content=system),
                dict(role="user", content=[dict(type="image"), dict(type="text", text=question)])]
    try:
        text = policy.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                    add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template for another model (text-only: no image parts) may raise
        warning = (f"warning: {folder}'s chat template cannot render a prompt with an image ({type(e).__name__}: "
                   f"{str(e)[:120]}): a template for another model? The prompt is the project's own.")
        print(warning)
        return warning
    pads = "<|image_pad|>" * (len(policy.image_block(grid)) - 2)
    theirs = policy.encode(text.replace("<|image_pad|>", pads))
    ours = policy.prompt_ids(question, grid, prompt=prompt)
    if theirs == ours:
        return None
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    show = lambda ids: repr(policy.tokenizer.decode(ids[at:at + 8]))  # noqa: E731
    warning = (f"warning: {folder}'s chat template renders the prompt differently from token {at} on: "
               f"ours {show(ours)}, template {show(theirs)}")
    print(warning)
    return warning


# ---------------------------------------------------------------- memory estimate (no download)

PROMPT_TOKENS = 400  # system prompt (tool schema) + question + template, without the image


def model_config(name):
    """(config dict, where it came from) for the memory estimate: the built-in shapes, or the model's own
    config.json (any Qwen2.5-VL size). Nothing is downloaded: a model that cannot be found is an error."""
    if name in BUILT_IN:
        shape = SHAPES[SHAPE_OF[name]]
        text = {k: v for k, v in shape["text"].items() if k != "mrope_section"}
        return dict(text, vocab_size=text.get("vocab_size", 602), vision_config=dict(
            shape["vision"], out_hidden_size=text["hidden_size"])), f"the built-in {name}"
    folder = locate(name, download=False)
    return snapshot.read_config(folder), os.path.join(folder, "config.json")


def estimate_memory(cfg):
    """Peak GPU memory of a training step by part, in GB, from the shapes in the model's config.json.

    cfg: train.Config (model, base_precision, lora_r, group_size, prompts_per_step, rollout_rows, micro_batch,
    global_tokens, max_response_tokens, gradient_checkpointing, decode). A group's gradient is taken while the other
    rows roll on (train.run_step streams the step), so the peak is the sum of every part: weights, LoRA/optimizer,
    the rollout's KV cache, and a micro-batch's activations and log-prob chunks."""
    config, _ = model_config(cfg.model)
    h, layers, heads, kv, mlp, vocab, tied = snapshot.lm_shape(config)
    hd = h // heads
    linear = layers * (2 * h * h + 2 * h * kv * hd + 3 * h * mlp)  # q, o, k, v, gate/up/down
    precision = base_precision(cfg.model, cfg.base_precision)
    per_weight = 4 if precision == "fp32" else 2  # bytes of a weight kept unquantized: bf16 unless fp32 is asked
    weights = linear * (0.5 + 0.127 / 8 if precision == "nf4" else per_weight)  # NF4 + double-quantised constants
    # embeddings, head and vision tower
    weights += (vocab * h * (1 if tied else 2) + snapshot.vision_params(config)) * per_weight
    lora = layers * cfg.lora_r * (2 * h + 2 * h + 2 * (h + kv * hd) + 3 * (h + mlp))
    lora_bytes = lora * 16  # fp32 weight, gradient and two AdamW moments
    seq = PROMPT_TOKENS + cfg.global_tokens + cfg.max_response_tokens
    rows = min(cfg.rollout_rows or 1 << 30, cfg.prompts_per_step * cfg.group_size)  # 0: the step's rows at most
    kv_cache = rows * seq * layers * 2 * kv * hd * 2  # K and V in bf16
    if cfg.gradient_checkpointing:  # a checkpoint per layer, plus one layer recomputed with its gradients
        per_token = layers * h * 2 + (4 * h + 3 * mlp) * 2 * 2
    else:  # every layer keeps its attention and MLP activations
        per_token = layers * (10 * h + 4 * mlp) * 2
    activations = cfg.micro_batch * seq * per_token
    n = cfg.micro_batch * cfg.max_response_tokens
    # the gradient (N, D) fp32 and one chunk of logits: fp32, its bf16 matmul output, and p in bf16
    logprobs = n * h * 4 + min(n * vocab, kernels.logprobs.CHUNK_ELEMENTS) * (4 + 2 + 2)
    # decode.py's static cache (CUDA graphs: --decode auto or graphs on a GPU) stays allocated beside the dynamic
    # one the rollout returns to at tool turns and joins: a second KV cache, of whole COLUMN_STEPs of columns
    static = kv_cache * decode.columns(seq) / seq if cfg.decode != "dynamic" else 0
    parts = dict(weights=weights, lora_and_optimizer=lora_bytes, kv_cache=kv_cache, static_kv_cache=static,
                 activations=activations, logprob_chunks=logprobs,
                 cuda_overhead=0 if cfg.model in ("tiny", "micro") else 1.5e9)
    gb = {k: v / 1e9 for k, v in parts.items()}
    gb["peak"] = sum(gb.values())
    return gb


# ---------------------------------------------------------------- export

def export(adapter, out, name=None):
    """Merge a trained adapter into its bf16 base and write a folder that loads wherever the base loads
    (transformers 4 and 5, vLLM, lmms-eval): the base's own files, tensor names, shards and dtype, with the
    merged weights (snapshot.merge), and the adapter alone in out/adapter in PEFT's format."""
    meta = os.path.join(adapter, "config.json")  # our checkpoints record the run's Config, base model included
    run = json.load(open(meta)) if os.path.exists(meta) else {}
    name = name or run.get("model")
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):  # first: a mistyped path is no adapter
        raise SystemExit(f"error: {adapter} holds no adapter_config.json (not a PEFT adapter folder)")
    if not name:
        raise SystemExit(f"error: {adapter} does not say which base model it was trained on: pass --model")
    snapshot.check_adapter(adapter)
    with tempfile.TemporaryDirectory() as tiny:  # the built-in model has no folder: write one to merge into
        base = save_tiny(tiny, run.get("seed", 0), name) if name in BUILT_IN else locate(name)
        num_merged = snapshot.merge(base, adapter, out)
    print(f"merged {adapter} into {base} ({num_merged} weights) -> {out}; the adapter alone in "
          f"{os.path.join(out, 'adapter')}")
    return out


def main():
    import argparse

    ap = argparse.ArgumentParser(description="Model utilities.")
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="merge an adapter into its base model and save a plain checkpoint")
    ex.add_argument("--adapter", required=True, help="an adapter folder (e.g. runs/stage2/final)")
    ex.add_argument("--out", required=True, help="folder for the merged checkpoint")
    ex.add_argument("--model", default=None, help="the base model (default: the one the adapter's run used)")
    args = ap.parse_args()
    export(args.adapter, args.out, args.model)


if __name__ == "__main__":
    main()
