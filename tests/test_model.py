"""model.py: Qwen's 3-D positions, the tiny model, log-probs from hidden states."""
import torch

import crop
import model
from helpers import assert_logprobs_replay, tiny_policy


def test_head_rows_past_the_tokenizer_are_banned_unless_they_are_most_of_the_head():
    """Qwen2.5-VL-7B's head has 399 rows past its tokenizer, which decode to nothing: never drawn. A head that is
    mostly such rows (tiny-7b: the 7B's shape, the tiny tokenizer) keeps them, or it would draw from a few
    hundred ids, end tokens among them."""
    import torch.nn as nn

    m, tok = model.build_tiny(seed=0)
    vision = len(model.Policy(m, tok).banned)
    for extra, banned in ((len(tok) // 200, True), (len(tok) * 50, False)):
        m.lm_head = nn.Linear(m.lm_head.in_features, len(tok) + extra, bias=False)
        p = model.Policy(m, tok)
        assert len(p.banned) == vision + (extra if banned else 0)


def _sequence(policy, sizes):
    """A prompt with one image, then a tool turn per extra image, as the rollout builds them."""
    grids = [crop.encode_image(torch.zeros(h, w, 3, dtype=torch.uint8), max_pixels=64 * 784)[1][0] for h, w in sizes]
    ids = policy.prompt_ids("what?", grids[0]) + policy.encode("<think>x</think>")
    for g in grids[1:]:
        ids += policy.encode("<tool_call>{}</tool_call>") + policy.tool_turn_ids(False, grid=g)
    return ids, torch.stack(grids)


def test_rope_positions_match_transformers():
    p = tiny_policy()
    ids, grids = _sequence(p, [(300, 500), (100, 90), (56, 400)])
    ours, nxt = model.rope_positions(ids, grids, p.image_pad)
    t = torch.tensor([ids])
    ref, _ = p.lm.get_rope_index(t, (t == p.image_pad).int(), image_grid_thw=grids)
    assert torch.equal(ours, ref[:, 0])
    assert nxt == int(ref.max()) + 1


def test_rope_positions_continue_across_chunks():
    """Positions of a sequence computed in pieces (as the rollout does) equal those of the whole."""
    p = tiny_policy()
    ids, grids = _sequence(p, [(300, 500), (100, 90)])
    whole, _ = model.rope_positions(ids, grids, p.image_pad)
    cut = len(p.prompt_ids("what?", grids[0])) + 3
    a, nxt = model.rope_positions(ids[:cut], grids[:1], p.image_pad)
    b, _ = model.rope_positions(ids[cut:], grids[1:], p.image_pad, start=nxt)
    assert torch.equal(torch.cat([a, b], 1), whole)


def test_tiny_model_is_seeded():
    a, _ = model.build_tiny(seed=3)
    b, _ = model.build_tiny(seed=3)
    c, _ = model.build_tiny(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_tokenizer_has_qwen_specials_and_template():
    tok = model.build_tiny_tokenizer()
    for t in model.SPECIAL_TOKENS + model.TOOL_TOKENS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    s = '<tool_call>{"bbox_2d": [1, 2]}</tool_call>'
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_prompt_has_one_pad_per_token():
    p = tiny_policy()
    pv, grid = crop.encode_image(torch.zeros(300, 500, 3, dtype=torch.uint8), max_pixels=64 * 784)
    ids = p.prompt_ids("q", grid[0])
    assert ids.count(p.image_pad) == pv.shape[0] // 4 == int(grid.prod()) // 4


def test_sequence_logprobs_equal_full_logits():
    """Log-probs from hidden states at loss positions equal log_softmax of the model's own full logits."""
    p = tiny_policy()
    pv, grid = crop.encode_image(torch.randint(0, 255, (200, 300, 3), dtype=torch.uint8), max_pixels=32 * 784)
    ids = p.prompt_ids("q", grid[0]) + p.encode("<answer>B</answer><|im_end|>")
    n_resp = len(p.encode("<answer>B</answer><|im_end|>"))
    t = torch.tensor([ids])
    mask = torch.zeros_like(t)
    mask[0, -n_resp:] = 1
    pos = model.rope_positions(ids, grid, p.image_pad)[0][:, None]
    batch = dict(ids=t, attention_mask=torch.ones_like(t), position_ids=pos, loss_mask=mask, pixel_values=pv,
                 grid_thw=grid)
    with torch.no_grad():
        ours = model.sequence_logprobs(p, batch, temperature=0.8)
        logits = p.model(input_ids=t, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=(t == p.image_pad).int()).logits
    ref = torch.log_softmax(logits[0, -n_resp - 1:-1] / 0.8, -1).gather(-1, t[0, -n_resp:, None]).squeeze(-1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_reference_disables_adapter():
    p = tiny_policy()
    lora_b = [m for n, m in p.model.named_parameters() if "lora_B" in n][0]
    pv, grid = crop.encode_image(torch.randint(0, 255, (100, 100, 3), dtype=torch.uint8), max_pixels=16 * 784)
    ids = p.prompt_ids("q", grid[0])
    t = torch.tensor([ids])
    pos = model.rope_positions(ids, grid, p.image_pad)[0][:, None]
    with torch.no_grad():
        base, _ = p.forward_hidden(t, torch.ones_like(t), pos, pv, grid)
        lora_b.add_(0.5)
        moved, _ = p.forward_hidden(t, torch.ones_like(t), pos, pv, grid)
        with p.reference():
            ref, _ = p.forward_hidden(t, torch.ones_like(t), pos, pv, grid)
        lora_b.sub_(0.5)
    assert not torch.allclose(base, moved)
    torch.testing.assert_close(ref, base)


def test_qlora_rollout_update_rollout_on_cpu(monkeypatch):
    """The QLoRA path on CPU: the tiny model's language model in NF4 with LoRA; rollout (no grad), update
    (grad), rollout again. Run as on a CPU with AVX512-BF16, where bitsandbytes repacks 4-bit weights into
    an inference-only layout on the first no-grad eval forward (the cause of the in-place failure)."""
    import bitsandbytes as bnb
    import dataclasses

    import data
    import train
    from rollout import RolloutConfig, rollout

    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    p = model.load_policy("tiny", precision="nf4", lora_r=4, lora_alpha=8)
    quantized = [m for m in p.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7 and all(m.weight.quant_type == "nf4" for m in quantized)  # 7 linears a layer
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in p.lm.visual.modules())  # the vision tower stays
    rcfg = RolloutConfig(group_size=4, max_turn_tokens=10, max_response_tokens=10, global_tokens=16)
    samples = data.synthetic(1, seed=5, min_side=300, max_side=400)
    episodes = rollout(p, samples, rcfg)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in quantized)
    batch, full = assert_logprobs_replay(p, episodes)  # through the same 4-bit weights
    # ... and differ from the unquantized model's: the 4-bit weights are really used
    with torch.no_grad():  # tiny_policy: the same seed in fp32, its LoRA at the zero init
        assert (model.sequence_logprobs(tiny_policy(), batch) - full).abs().max() > 1e-3
    lora = {n: w.detach().clone() for n, w in p.model.named_parameters() if w.requires_grad}
    cfg = dataclasses.replace(train.Config(), micro_batch=4, lr=1e-2)
    opt = torch.optim.AdamW(p.trainable_parameters(), lr=cfg.lr)
    stats = train.train_step(p, opt, episodes, torch.tensor([1.0, -1.0, 0.5, -0.5]), cfg)
    assert stats["skipped"] == 0 and stats["grad_norm"] > 0
    moved = [n for n, w in p.model.named_parameters() if w.requires_grad and not torch.equal(w, lora[n])]
    # every B matrix got a gradient through the 4-bit layers (A's gradient is 0 while B is at its zero init)
    assert {n for n in lora if "lora_B" in n} <= set(moved)
    again = rollout(p, samples, rcfg, step=1)
    assert all(e.num_generated > 0 for e in again)
