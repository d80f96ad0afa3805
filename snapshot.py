"""A Qwen2.5-VL model folder on disk (a Hub download or an export): finding it, checking it before use,
reading its shapes from config.json, checking an adapter a run wrote (its weights' sha256), and writing an adapter
merged into it.

Every check fails with one line that names the file and what is wrong with it, before any weight is read.

    python -c "import snapshot; snapshot.check(snapshot.resolve('ckpt/qwen25vl7b'))"   # what --dry-run checks
"""
import hashlib
import json
import math
import os
import re
import shutil
import socket
import urllib.parse
import urllib.request

# owner/name: what a Hugging Face Hub id looks like (Qwen's models always have an owner)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
INDEX = "model.safetensors.index.json"
# tokens the project writes or parses, each with the config.json key that holds its id (None: no key; the
# tokenizer must still know it as one token)
SPECIAL_IDS = {"<|image_pad|>": "image_token_id", "<|vision_start|>": "vision_start_token_id",
               "<|vision_end|>": "vision_end_token_id", "<|im_end|>": "eos_token_id", "<|im_start|>": None,
               "<tool_call>": None, "</tool_call>": None}


# ---------------------------------------------------------------- where it is

def looks_like_path(name):
    """A name meant as a local folder rather than a Hub id: it starts with '.', '~' or '/', is not of the form
    owner/name, or its first part is a folder here (ckpt/qwen25vl7b when ckpt/ exists)."""
    return (name.startswith((".", "~", "/")) or not HUB_ID.match(name)
            or os.path.isdir(name.split("/")[0]))


def resolve(name, download=True):
    """The absolute path of a model folder: a local folder as is, a Hub id from the local Hub cache, else
    downloaded (download=True). A path that does not exist, or a Hub that cannot be reached, fails at once."""
    path = os.path.abspath(os.path.expanduser(name))
    if os.path.isdir(path):
        return path
    if looks_like_path(name):
        raise SystemExit(f"error: no such folder: {path} (from --model {name})")
    return _from_hub(name, download)


def _from_hub(name, download):
    from huggingface_hub import constants, snapshot_download

    try:
        cached = snapshot_download(name, local_files_only=True)  # already in the Hub cache
    except OSError:  # LocalEntryNotFoundError: not cached
        cached = None
    # a download cut short leaves a snapshot with some files: the download resumes. Without one (--dry-run,
    # offline), check() names the first missing file
    if cached and (not download or constants.HF_HUB_OFFLINE or _complete(cached)):
        return cached
    hint = (f"No folder {os.path.abspath(name)} either. Download it where there is network (hf download {name} "
            f"--local-dir DIR), then pass --model DIR (a local folder)")
    if not download:
        raise SystemExit(f"error: {name} is not downloaded. {hint}")
    if constants.HF_HUB_OFFLINE:
        raise SystemExit(f"error: {name} is not in the Hub cache and HF_HUB_OFFLINE is set. {hint}")
    if cached:
        print(f"{name}: the Hub cache holds part of it ({cached}): downloading the rest")
    host, port, proxy = _first_hop(constants.ENDPOINT)
    try:  # a few seconds, instead of the Hub client's minute of retries
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        via = f" through the proxy {proxy}" if proxy else ""
        raise SystemExit(f"error: cannot reach {constants.ENDPOINT}{via} to download {name} ({e}). {hint}") from None
    try:
        return snapshot_download(name)
    except OSError as e:  # HfHubHTTPError (no such repository, gated, ...) is an OSError
        raise SystemExit(f"error: cannot download {name}: {str(e).splitlines()[0]}. {hint}") from None


def _complete(folder):
    """A cached snapshot has the files a load needs: config.json, every weight shard and a tokenizer."""
    try:
        names = ["config.json"] + shards(folder)
    except SystemExit:  # a damaged index: not a missing file, which check() reports
        return True
    try:
        tokenizer_file(folder)
    except SystemExit:  # neither tokenizer.json nor vocab.json and merges.txt
        return False
    return all(os.path.isfile(os.path.join(folder, n)) for n in names)


def _first_hop(endpoint):
    """(host, port, proxy or None): where a connection to the Hub goes first. Behind a proxy (HTTPS_PROXY, ...,
    unless NO_PROXY exempts the Hub's host) that is the proxy: the Hub itself may be unreachable directly."""
    url = urllib.parse.urlparse(endpoint)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(url.hostname):
        p = urllib.parse.urlparse(proxy if "://" in proxy else "http://" + proxy)
        return p.hostname, p.port or (443 if p.scheme == "https" else 80), proxy
    return url.hostname, url.port or (443 if url.scheme == "https" else 80), None


# ---------------------------------------------------------------- what is in it

def read_config(folder):
    """config.json as a dict."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} is missing (not a model folder, or an incomplete download)")
    return read_json(path)


def read_json(path):
    """A JSON file of the folder; a cut-off or damaged one is one line naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path} is not valid JSON ({e})") from None


def text_config(config):
    """The language model's settings: at the top of config.json in the Hub's layout (transformers 4), under
    text_config in transformers 5's."""
    return {**config, **config.get("text_config", {})}


def shards(folder):
    """The safetensors files holding the weights, from the index when there is one."""
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        return sorted(set(read_json(index)["weight_map"].values()))
    return ["model.safetensors"]


def _check_shard(folder, shard):
    """A shard exists and is as long as its header says (a cut-off download is caught here)."""
    path = os.path.join(folder, shard)
    listed = f" (listed in {INDEX})" if os.path.isfile(os.path.join(folder, INDEX)) else ""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} is missing{listed}: an incomplete download?")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n)) if 0 < n < size else None
        except (ValueError, UnicodeDecodeError):
            header = None
    if header is None:
        raise SystemExit(f"error: {path} is not a safetensors file")
    end = 8 + n + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size < end:
        raise SystemExit(f"error: {path} is truncated: {size:,} bytes of {end:,}; download it again")


def tokenizer_file(folder):
    """The file the tokenizer comes from, or a one-line error when the download lacks it."""
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return os.path.join(folder, "tokenizer.json")
    if all(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "merges.txt")):
        return os.path.join(folder, "vocab.json")
    raise SystemExit(f"error: {folder} has no tokenizer (tokenizer.json, or vocab.json and merges.txt): an "
                     f"incomplete download?")


def check(folder):
    """Check a model folder before loading it and return its tokenizer: config.json reads, every shard is
    there and whole, and the tokenizer knows the special tokens at the ids config.json gives them."""
    from transformers import AutoTokenizer

    config = read_config(folder)
    for shard in shards(folder):
        _check_shard(folder, shard)
    source = tokenizer_file(folder)
    chat_template(folder)  # a damaged template file is said now, not after the weights have loaded
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - a cut-off tokenizer file raises whatever its parser raises
        raise SystemExit(f"error: {source}: the tokenizer does not load ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}; an incomplete download?)") from None
    # the ids as transformers reads them: the top level first (a transformers 4.5x config repeats the language
    # model's keys under text_config, its image_token_id null), then text_config's
    ids = {**text_config(config), **{k: v for k, v in config.items() if k.endswith("_token_id") and v is not None}}
    for token, key in SPECIAL_IDS.items():
        got = tokenizer.convert_tokens_to_ids(token)
        want = ids.get(key) if key else None
        want = want[0] if isinstance(want, list) else want
        if got is None or got == tokenizer.unk_token_id or (want is not None and got != want):
            said = f"config.json says {key} = {want}" if want is not None else "it should be one known token"
            raise SystemExit(f"error: {source}: {token} is id {got}, but {said} (a tokenizer from another model, "
                             f"or an incomplete download?)")
    return tokenizer


def chat_template(folder):
    """The chat template a snapshot ships (chat_template.json, chat_template.jinja or tokenizer_config.json),
    or None."""
    for name, key in (("chat_template.json", "chat_template"), ("chat_template.jinja", None),
                      ("tokenizer_config.json", "chat_template")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            if key:
                template = read_json(path).get(key)
            else:
                with open(path) as f:
                    template = f.read()
            if template:
                return template
    return None


# ---------------------------------------------------------------- shapes (memory estimate)

def lm_shape(config):
    """(hidden, layers, query heads, KV heads, MLP, vocab, tied embeddings) of the language model."""
    t = text_config(config)
    return (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"],
            t["intermediate_size"], t["vocab_size"], bool(t.get("tie_word_embeddings", False)))


def vision_params(config):
    """Parameters of the vision tower: patch embedding, blocks (attention, gated MLP, two norms), merger."""
    v = config["vision_config"]
    h, mlp, depth = v["hidden_size"], v["intermediate_size"], v["depth"]
    patch = 3 * v.get("temporal_patch_size", 2) * v.get("patch_size", 14) ** 2 * h
    block = (3 * h * h + 3 * h) + (h * h + h) + (3 * h * mlp + 2 * mlp + h) + 2 * h
    merged = h * v.get("spatial_merge_size", 2) ** 2
    out = v.get("out_hidden_size", text_config(config)["hidden_size"])
    merger = h + (merged * merged + merged) + (merged * out + out)
    return patch + depth * block + merger


# ---------------------------------------------------------------- export

def _weight_names(folder):
    """Tensor name -> shard file, for every weight in the folder."""
    from safetensors import safe_open

    names = {}
    for shard in shards(folder):
        with safe_open(os.path.join(folder, shard), "pt") as f:
            names.update(dict.fromkeys(f.keys(), shard))
    return names


def _base_name(weight, names):
    """The name a weight has in the base folder. transformers 5 nests the language model and the vision tower
    under `model.`; Hub snapshots of Qwen2.5-VL keep the older flat names (model.layers.*, visual.*)."""
    for candidate in (weight, re.sub(r"^model\.language_model\.", "model.", weight),
                      re.sub(r"^model\.visual\.", "visual.", weight)):
        if candidate in names:
            return candidate
    return None


def _lora_deltas(adapter, names):
    """Base tensor name -> (A, B, scale) for every LoRA pair of a PEFT adapter folder."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter, "adapter_config.json")) as f:
        acfg = json.load(f)
    if acfg.get("use_dora") or acfg.get("rank_pattern") or acfg.get("alpha_pattern"):
        raise SystemExit(f"error: {adapter}/adapter_config.json: DoRA and per-layer ranks are not supported here")
    r = acfg["r"]
    scale = acfg["lora_alpha"] / (math.sqrt(r) if acfg.get("use_rslora") else r)
    weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    deltas = {}
    for key, a in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        target = _base_name(module + ".weight", names)
        if target is None:
            raise SystemExit(f"error: {adapter}: the adapter changes {module}, which the base model does not have")
        deltas[target] = (a, weights[key.replace(".lora_A.", ".lora_B.")], scale)
    return deltas


def check_adapter(folder):
    """An adapter folder a run wrote (its final/ or a step's) whose weights or settings changed since would be
    evaluated, or trained on, as another model under its name: stops, naming the file. A folder with no recorded
    sha256 (another tool's adapter, an older run's) passes."""
    try:
        with open(os.path.join(folder, "state.json")) as f:
            sums = json.load(f).get("sha256")
    except (OSError, ValueError, AttributeError):
        return
    try:
        check_files(folder, sums, ("adapter_config.json", "adapter_model.safetensors"))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def check_files(folder, sums, names):
    """Files of a folder a run wrote, against the sha256 it recorded (sums: name -> sha256; a name it lacks, or
    sums not a dict, is not checked): the first missing or changed one raises ValueError naming it."""
    for name in names:
        file = os.path.join(folder, name)
        if not isinstance(sums, dict) or name not in sums:
            continue
        if not os.path.isfile(file):
            raise ValueError(f"{file} is missing (the checkpoint recorded it)")
        try:
            digest = sha256(file)
        except OSError as e:  # a bad sector: as damaged as a changed byte
            raise ValueError(f"{file} is damaged ({e})") from None
        if digest != sums[name]:
            raise ValueError(f"{file} is damaged (its sha256 is not the one recorded when it was written)")


def sha256(path):
    """A file's sha256 (hex), read in blocks: a checkpoint's optimizer state is hundreds of MB."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def merge(base, adapter, out):
    """Write `out` as a copy of the base folder with the adapter merged into its weights: W + scale * B A
    computed in fp32 and stored in W's own dtype, under the base's own tensor names, shards and index. Every
    other file (config, tokenizer, chat template, processor and generation configs) is copied unchanged:
    training changes none of them. The adapter alone goes to out/adapter."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    names = _weight_names(base)
    deltas = _lora_deltas(adapter, names)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(base):
        if os.path.isfile(os.path.join(base, name)) and not name.endswith(".safetensors"):
            shutil.copy2(os.path.join(base, name), os.path.join(out, name))
    for shard in shards(base):  # one shard in memory at a time: a 7B merges in a few GB
        with safe_open(os.path.join(base, shard), "pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for k in tensors.keys() & deltas.keys():
            a, b, scale = deltas[k]
            tensors[k] = (tensors[k].float() + scale * (b.float() @ a.float())).to(tensors[k].dtype)
        save_file(tensors, os.path.join(out, shard), metadata=metadata)
    shutil.copytree(adapter, os.path.join(out, "adapter"), dirs_exist_ok=True)
    return len(deltas)
