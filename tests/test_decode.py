"""decode.py: the static-cache decode path gives the dynamic path's episodes and log-probs (eagerly on CPU; on
CUDA the same steps replay a captured graph), and the fallback logic: which steps run eagerly, and a capture
that fails turns graphs off without losing the rollout."""
import dataclasses
import functools
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import data
import decode
import model
import rollout as rollout_module
from helpers import ANSWER, CALL, rollout_cfg, scripted, tiny_policy
from rollout import rollout


def _episodes(p, mode, **kw):
    # three groups through rows for two: a group joins mid-flight; tool turns with crops; free sampling after
    script = scripted(p, {0: [CALL.format("[5, 5, 60, 40]"), ANSWER], 1: ["<think>hm</think>" + ANSWER],
                          2: ["<think>look</think>" + CALL.format("[0, 0, 20, 20]")]})
    cfg = rollout_cfg(group_size=2, rollout_rows=4, global_tokens=48, temperature=0.9, max_turn_tokens=56,
                      max_response_tokens=170, decode=mode, **kw)
    return rollout(p, data.synthetic(3, seed=21, min_side=300, max_side=400), cfg, force=script)


def test_static_decode_gives_the_dynamic_paths_episodes(monkeypatch):
    p = tiny_policy()
    loads = []
    real_load = decode.StaticDecode.load
    monkeypatch.setattr(decode, "COLUMN_STEP", 16)  # small buckets: the stretch outgrows its columns
    monkeypatch.setattr(decode.StaticDecode, "load", lambda self, b: loads.append(b.mask_hist.shape) or real_load(self, b))
    dynamic = _episodes(p, "dynamic")
    assert not loads  # the dynamic path never touches the static cache
    masked, real_step = [], decode.StaticDecode.step
    monkeypatch.setattr(decode.StaticDecode, "step", lambda self, rows: masked.append(
        sum(not r.pending for r in rows)) or real_step(self, rows))
    static = _episodes(p, "static")
    assert len(loads) > 3  # stretches between tool turns, finished rows, joins and full buckets
    assert sum(m > 0 for m in masked) > 3  # steps with a row masked: its tool turn waiting for company
    assert [e.ids for e in static] == [e.ids for e in dynamic] and sum(e.num_tool_calls for e in static) == 4
    for a, b in zip(static, dynamic):
        torch.testing.assert_close(torch.tensor(a.logps), torch.tensor(b.logps), atol=1e-4, rtol=0)


def test_a_batch_that_finishes_whole_on_the_static_path_lets_the_next_group_in():
    """Rows for one group: each group's rows all finish in one step, on the static cache, and the batch empties
    before the next group is admitted (nothing is left loaded to unload into it). Episodes as on the dynamic path."""
    p = tiny_policy()
    script = scripted(p, {g: ["<answer>B</answer><|im_end|>"] for g in range(2)})
    cfg = rollout_cfg(group_size=2, rollout_rows=2, global_tokens=16)
    samples = data.synthetic(2, seed=21, min_side=300, max_side=400)
    dynamic, static = (rollout(p, samples, dataclasses.replace(cfg, decode=mode), force=script)
                       for mode in ("dynamic", "static"))
    assert [e.group for e in static] == [0, 0, 1, 1] and all(e.finished for e in static)
    assert [e.ids for e in static] == [e.ids for e in dynamic]


def test_which_steps_run_eagerly():
    row = lambda pending, images=(): types.SimpleNamespace(pending=pending, pending_images=list(images))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert decode.why_eager([row([5]), row([6])], cuda, graphs=True) is None
    assert decode.why_eager([row([5]), row([6])], cpu, graphs=False) is None  # the static path, eagerly
    assert "decode step" in decode.why_eager([row([5]), row([6, 7])], cuda, graphs=True)  # a tool turn
    assert "decode step" in decode.why_eager([row([5], [("pixels", "grid")])], cuda, graphs=True)  # an image
    assert "rows" in decode.why_eager([row([5])] * (decode.ROW_BUCKETS[-1] + 1), cuda, graphs=True)
    assert "CUDA" in decode.why_eager([row([5])], cpu, graphs=True)


def _loaded(p, cfg):
    """Two rows prefilled, each with one token to feed, loaded into a StaticDecode that asks for graphs."""
    rows = rollout_module._new_rows(p, 0, data.synthetic(1, seed=22)[0], cfg, 0)
    batch = rollout_module._prefill(p, rows, 2)
    for r in batch.live:
        r.pending, r.pending_images = [p.encode("hm")[0]], []
    static = decode.StaticDecode(p, graphs=True)
    static.load(batch)
    return batch, static


def test_a_failed_capture_turns_graphs_off_and_the_step_still_runs(capsys, monkeypatch):
    """For the rest of the process: the next rollout call (a training step's) neither pays for a failed capture
    again nor prints it again."""
    def refuse():
        raise RuntimeError("operation not permitted when stream is capturing")

    p = tiny_policy()  # first: transformers' import reads torch.cuda.CUDAGraph
    monkeypatch.setattr(torch.cuda, "CUDAGraph", refuse)  # on a GPU; on a CPU, torch.cuda.Stream() fails first
    monkeypatch.setattr(decode, "graphs_failed", None)
    cfg = rollout_cfg(group_size=2, global_tokens=48, decode="static")
    with torch.no_grad():
        batch, static = _loaded(p, cfg)
        h = static.step(batch.live)
    assert "CUDA graph capture failed" in capsys.readouterr().out and not static.graphs
    assert h.shape == (2, p.head.weight.shape[1]) and torch.isfinite(h).all()
    assert static.mask[2:, 0].all()  # the bucket's padding rows attend to one column (none: NaNs in the graph)
    assert static.shape == (decode.ROW_BUCKETS[0], decode.COLUMN_STEP * (1 + batch.mask_hist.shape[1] // decode.COLUMN_STEP))
    assert "CUDA graph capture failed" in decode.graphs_failed
    again = rollout_module._static_decode(p, dataclasses.replace(cfg, decode="graphs"))
    assert not again.graphs and not decode.StaticDecode(p).graphs and "capture failed" not in capsys.readouterr().out


def test_a_capture_failing_inside_gives_the_stream_back_and_out_of_memory_goes_up(monkeypatch, capsys):
    """torch.cuda's streams and graph stubbed on a CPU (torch.cuda.graph is torch's own class). An op that fails
    inside the capture makes capture_end raise, and torch.cuda.graph's exit then skips its stream restore: the
    eager fallback and all training after it ran on the capture stream. Out of memory while capturing goes up
    to the training loop (which halves the rows); it was taken for a failed capture, graphs off for good."""
    p = tiny_policy()  # first: transformers' import reads torch.cuda's classes
    current, capturing = ["default"], [False]

    class Stream:
        def __init__(self, name="capture"):
            self.name = name

        def wait_stream(self, other):
            pass

    class StreamContext:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            self.prev, current[0] = current[0], self.stream.name

        def __exit__(self, *exc):
            current[0] = self.prev

    class Graph:
        def capture_begin(self, *a, **kw):
            capturing[0] = True

        def capture_end(self):
            capturing[0] = False
            raise RuntimeError("operation failed due to a previous error during capture")

    for name, fake in dict(Stream=Stream, stream=StreamContext, current_stream=lambda *a: Stream(current[0]),
                           set_stream=lambda s: current.__setitem__(0, s.name), synchronize=lambda *a: None,
                           empty_cache=lambda: None, CUDAGraph=Graph).items():
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: None, raising=False)
    monkeypatch.setattr(torch.cuda.graph, "default_capture_stream", None)  # torch keeps the first one made
    monkeypatch.setattr(decode, "graphs_failed", None)
    real_run, fail = decode.StaticDecode._run, {}

    def run(self):
        if fail.get("oom") == "warm-up" or (fail.get("oom") == "capture" and capturing[0]):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        if capturing[0]:
            raise RuntimeError("operation not permitted when stream is capturing")
        real_run(self)

    monkeypatch.setattr(decode.StaticDecode, "_run", run)
    cfg = rollout_cfg(group_size=2, global_tokens=48, decode="static")
    for case in ("inside", "warm-up", "capture"):  # an op failing inside the capture; out of memory in either
        fail["oom"] = case
        with torch.no_grad():
            batch, static = _loaded(p, cfg)
            if case == "inside":
                static.step(batch.live)
                assert current[0] == "default" and not static.graphs
                assert "operation not permitted when stream is capturing" in capsys.readouterr().out
            else:
                monkeypatch.setattr(decode, "graphs_failed", None)
                length = static.cache.layers[0].cumulative_length.clone()
                with pytest.raises(torch.OutOfMemoryError):
                    static.step(batch.live)
                assert decode.graphs_failed is None and current[0] == "default"
                assert torch.equal(static.cache.layers[0].cumulative_length, length)  # rewound


def _loads(p, static, batches):
    """Each (rows, columns) batch loaded into `static` and unloaded: the buffers' shape and identity at each."""
    from transformers import DynamicCache

    text = p.lm.config.text_config
    kv_shape = (text.num_key_value_heads, text.hidden_size // text.num_attention_heads)
    seen = []
    for rows, width in batches:
        cache = DynamicCache(config=text)
        for i in range(text.num_hidden_layers):
            cache.update(*[torch.zeros(rows, kv_shape[0], width, kv_shape[1])] * 2, i)
        batch = types.SimpleNamespace(cache=cache, mask_hist=torch.ones(rows, width, dtype=torch.long))
        static.load(batch)
        seen.append((static.shape, id(static.cache)))
        static.unload(batch)
        assert batch.mask_hist.shape == (rows, width) and batch.cache.layers[0].keys.shape[0] == rows
    return seen


def test_loaded_buffers_are_kept_while_they_hold_the_batch_at_most_twice_over(monkeypatch):
    """A new shape of the static cache means new buffers and, on a GPU, a new capture; a batch that fits the loaded
    buffers at most twice over (rows and columns) keeps them. No bucket holds more rows than the rollout has in
    flight (rollout_rows: what the memory estimate counts)."""
    monkeypatch.setattr(decode, "COLUMN_STEP", 16)
    p = tiny_policy()
    loads = functools.partial(_loads, p)

    seen = loads(decode.StaticDecode(p, graphs=False), [(6, 40), (5, 20), (3, 40), (6, 10), (12, 40), (6, 70)])
    # (rows, columns) needed: (8, 48), (8, 32), (8, 48), (8, 16), (16, 48), (8, 80)
    assert [shape for shape, _ in seen] == [(8, 48)] * 3 + [(8, 16), (16, 48), (8, 80)]
    assert len({buffers for _, buffers in seen[:3]}) == 1
    # 12 rows in flight at most: 12 rows in a bucket of 12, not 16; smaller batches in the same buffers
    seen = loads(decode.StaticDecode(p, graphs=False, max_rows=12), [(12, 40), (5, 40), (3, 40)])
    assert [shape for shape, _ in seen] == [(12, 48)] * 3
    cfg = rollout_module.RolloutConfig(group_size=8, rollout_rows=24, decode="static")
    assert rollout_module._static_decode(p, cfg).max_rows == 24


def test_a_full_bucket_is_its_own_and_buffers_twice_the_batch_are_kept(monkeypatch):
    """The edges of the rules above: a batch of exactly a bucket's rows takes that bucket (not the next, twice the
    memory), and buffers of exactly twice the rows or columns a batch needs still hold it (kept, with their graph)."""
    monkeypatch.setattr(decode, "COLUMN_STEP", 16)
    p = tiny_policy()
    assert [shape for shape, _ in _loads(p, decode.StaticDecode(p, graphs=False), [(8, 40), (16, 40)])] == \
        [(8, 48), (16, 48)]
    seen = _loads(p, decode.StaticDecode(p, graphs=False), [(12, 90), (6, 40)])  # needs (16, 96), then (8, 48)
    assert [shape for shape, _ in seen] == [(16, 96)] * 2 and seen[0][1] == seen[1][1]


# ops that wait for the device (a value or a data-dependent shape read on the host), and torch.tensor() of host
# values (a pageable host-to-device copy): a CUDA graph cannot capture them, and outside a graph each stalls
HOST_SYNCS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
              "aten.is_nonzero.default", "aten._unique2.default", "aten.equal.default", "aten.lift_fresh.default"}


class _SyncWatch(TorchDispatchMode):
    """Records host reads, and each step's trace: every op with its tensors' shapes and its other arguments."""

    def __init__(self):
        super().__init__()
        self.seen, self.trace = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_SYNCS:
            self.seen.append(str(func))
        spec = lambda a: (tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a
        self.trace.append((str(func), repr(torch.utils._pytree.tree_map(spec, (args, kwargs)))))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("precision", ["fp32", "nf4"])
def test_the_static_decode_step_never_waits_for_the_device(monkeypatch, precision):
    """What a graph capture needs, checked on a CPU: the model's forward on the static cache (HF's masks, rotary
    positions, attention, LoRA; bitsandbytes' 4-bit layers, as far as their CPU path goes) reads no value back
    to the host, and every step of a stretch runs the same ops with the same arguments but for the tensors'
    contents. A forward that read a value would fail to capture on a GPU and fall back to eager steps (test
    above), silently slow; one whose ops took a host value that moves from step to step (a position as a
    Python int) would capture it once and replay it: wrong tokens, no error."""
    p = model.load_policy("tiny", lora_r=4, lora_alpha=8, precision=precision, device="cpu")
    watch, steps, real_run = _SyncWatch(), [], decode.StaticDecode._run

    def watched(self):
        watch.trace, first = [], self.out is None  # a stretch's first step keeps its output buffer: one op less
        with watch:
            real_run(self)
        steps.append(((self.shape, self.live, first), watch.trace))

    monkeypatch.setattr(decode.StaticDecode, "_run", watched)
    cfg = rollout_cfg(group_size=2, rollout_rows=4, global_tokens=48, temperature=0.9, max_turn_tokens=20,
                      max_response_tokens=40, decode="static")
    rollout(p, data.synthetic(2, seed=21, min_side=300, max_side=400), cfg)
    assert len(steps) > 10 and watch.seen == []
    pairs = [(a, b) for (ka, a), (kb, b) in zip(steps, steps[1:]) if ka == kb]  # consecutive steps, one stretch
    assert len(pairs) > 5 and all(len(a) > 100 for a, _ in pairs)
    for a, b in pairs:
        assert a == b, next((f"op {i}: {x} then {y}" for i, (x, y) in enumerate(zip(a, b)) if x != y), "length")
    with watch:  # the watch itself sees a host read, and a host value in an op's arguments
        torch.ones(2).sum().item()
    assert watch.seen == ["aten._local_scalar_dense.default"]
    traces = []
    for k in (3, 4):
        watch.trace = []
        with watch:
            torch.arange(k, k + 1)
        traces.append(watch.trace)
    assert traces[0] != traces[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("precision", ["fp32", "nf4"])
def test_graph_replays_give_the_dynamic_paths_episodes(capsys, precision):
    """NF4 + LoRA is what a real run captures (bitsandbytes' kernels inside the graph). There bitsandbytes and
    cuBLAS choose their kernels by row count, and a static step runs at its bucket's rows: the last bits may
    differ from the dynamic path's, so a sampled token may too. Its episodes are compared up to that token."""
    if precision == "nf4":
        pytest.importorskip("bitsandbytes")
    p = model.load_policy("tiny", lora_r=4, lora_alpha=8, precision=precision, device="cuda")
    captures = decode.counters["captures"]
    dynamic, graphs = _episodes(p, "dynamic"), _episodes(p, "graphs")
    assert "capture failed" not in capsys.readouterr().out  # the replays ran, not the eager fallback
    assert decode.counters["captures"] > captures
    if precision == "fp32":
        assert [e.ids for e in graphs] == [e.ids for e in dynamic]
    for a, b in zip(graphs, dynamic):
        same = next((i for i, (x, y) in enumerate(zip(a.ids, b.ids)) if x != y), min(len(a.ids), len(b.ids)))
        assert same > a.prompt_len  # the first token at least
        torch.testing.assert_close(torch.tensor(a.logps[:same]), torch.tensor(b.logps[:same]),
                                   atol=1e-3 if precision == "fp32" else 5e-2, rtol=0)
