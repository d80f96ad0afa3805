"""Decode steps without per-step launch overhead: a static KV cache, and on CUDA a captured graph per shape.

A decode step (one new token per row, no image) of a 4-bit 7B model is launch- and Python-bound: ~1,700 kernel
launches through PEFT and HF modules, nearly the same time at 16 rows as at 64. Captured once as a CUDA graph,
the step is one replay. A graph needs fixed shapes and addresses, so a stretch of decode steps runs on a static
cache: the rollout's dynamic cache is copied into preallocated buffers of a bucket of rows x columns (`load`),
each step writes its token's keys and values in the next column (HF's StaticCache: a device-side counter, so
the replay needs no host value), and when the stretch ends (tool turns run, a row finishes or a group joins:
the shapes change) the live part goes back to a dynamic cache (`unload`). A row whose tool turn is waiting
(rollout.py) stays in the stretch, masked. Padding rows of the bucket attend to one column and are never read.
A batch that fits the loaded buffers at most twice over (rows and columns) keeps them, and their graph.
On CPU (tests) the same static path runs eagerly: it must give the dynamic path's tokens and log-probs.

Untested on a GPU so far: a failed capture turns graphs off for the rest of the process (printed once) and the
eager static path goes on; `bench.py rollout` times both. On a CPU, tests/test_decode.py checks that the step's
forward reads no value back to the host (a capture could not hold one).
"""
import time

import torch

ROW_BUCKETS = (8, 16, 32, 64, 128, 256)  # a batch runs in the smallest bucket that holds it [choice], or in a
# bucket of exactly the rollout's rows in flight (rollout_rows) when that is smaller
COLUMN_STEP = 256  # the static cache grows in steps of this many columns [choice]
# one-off costs of the graphs, summed over the process, so that bench.py can tell them from the steady step
counters = dict(captures=0, capture_seconds=0.0)
graphs_failed = None  # why a capture failed, if one did: graphs stay off for the rest of the process


def columns(length):
    """The static cache's columns for a batch `length` columns wide: whole COLUMN_STEPs, one column to spare at
    least (the next step's). model.estimate_memory counts the same."""
    return (length // COLUMN_STEP + 1) * COLUMN_STEP


def why_eager(rows, device, graphs):
    """None when this forward can run on the static path, else the reason it runs eagerly (tested)."""
    if any(len(r.pending) > 1 or r.pending_images for r in rows):
        return "not a decode step (a prompt, a tool turn or an image)"
    if len(rows) > ROW_BUCKETS[-1]:
        return f"more than {ROW_BUCKETS[-1]} rows"
    if graphs and device.type != "cuda":
        return "graphs need CUDA"
    return None


class StaticDecode:
    """The static cache of one rollout call, loaded and unloaded around stretches of decode steps."""

    def __init__(self, policy, graphs=None, max_rows=0):
        self.policy = policy
        self.graphs = (torch.cuda.is_available() if graphs is None else graphs) and not graphs_failed
        self.max_rows = max_rows  # the rollout's rows in flight: no bucket is larger (the memory estimate's rows)
        self.shape = None  # (rows, columns) of the buffers; None: nothing loaded
        self.graph = None
        self.live = 0  # rows of the bucket that hold real rows
        self.col = 0  # the next column to write

    def step(self, rows):
        """One token per row through the model on the static cache; a row with nothing pending (a tool turn
        waiting) feeds a masked pad. Returns the hidden states (B, D)."""
        B = len(rows)
        host = torch.tensor([[r.pending[0] if r.pending else self.policy.pad for r in rows],
                             [r.next_pos for r in rows], [len(r.pending) for r in rows]], device=self.policy.device)
        self.ids[:B, 0], self.pos[:, :B, 0], self.mask[:B, self.col] = host[0], host[1], host[2]
        for r in rows:
            r.next_pos += len(r.pending)
            r.pending = []
        if self.graph is None and self.graphs:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()
        self.col += 1
        return self.out[:B, 0].clone()

    def fits(self, n_rows):
        """The loaded buffers hold these rows and have a column left for the next step."""
        return self.shape is not None and n_rows == self.live and self.col < self.shape[1]

    def load(self, batch):
        """Copy the batch's dynamic cache and mask history into the static buffers (a new bucket if needed)."""
        from transformers import StaticCache

        B, L = batch.mask_hist.shape
        rows = next(b for b in ROW_BUCKETS if b >= B)
        if self.max_rows:  # 24 rows in flight: a bucket of 24, not 32 (a third more memory than --dry-run counts)
            rows = max(B, min(rows, self.max_rows))
        cols = columns(L)
        if self.shape and rows <= self.shape[0] <= 2 * rows and cols <= self.shape[1] <= 2 * cols:
            # the loaded buffers hold the batch at most twice over: kept, with their graph. A batch narrower for a
            # while (its longest row finished, then new rows grow back) would otherwise cost two captures
            rows, cols = self.shape
        dev = self.policy.device
        if self.shape != (rows, cols):  # new buffers (and a new graph) for a new shape
            self.graph = None
            self.cache = StaticCache(config=self.policy.lm.config.text_config, max_cache_len=cols)
            first = batch.cache.layers[0].keys
            for layer in self.cache.layers:  # it reads its arguments' shapes and makes its own (rows, cols) buffers
                shape = (rows,) + first.shape[1:2] + (0,) + first.shape[3:]
                layer.lazy_initialization(first.new_empty(shape), first.new_empty(shape))
            self.ids = torch.full((rows, 1), self.policy.pad, dtype=torch.long, device=dev)
            self.pos = torch.zeros(3, rows, 1, dtype=torch.long, device=dev)
            self.mask = torch.zeros(rows, cols, dtype=torch.long, device=dev)
            self.out = None
            self.shape = (rows, cols)
        for static, dynamic in zip(self.cache.layers, batch.cache.layers):
            static.keys[:B, :, :L] = dynamic.keys
            static.values[:B, :, :L] = dynamic.values
            static.cumulative_length.fill_(L)
        self.mask.zero_()
        self.mask[:B, :L] = batch.mask_hist
        self.mask[B:, 0] = 1  # padding rows attend to one column (an all-masked row would give NaNs)
        self.live, self.col = B, L
        batch.cache = None  # the static buffers hold the rows now

    def unload(self, batch):
        """The live rows' part of the static cache as a dynamic cache again, with its mask history."""
        from transformers import DynamicCache

        B, L = self.live, self.col
        cache = DynamicCache(config=self.policy.lm.config.text_config)
        for i, static in enumerate(self.cache.layers):  # update() copies: the buffers stay the static path's
            cache.update(static.keys[:B, :, :L], static.values[:B, :, :L], i)
        batch.cache, batch.mask_hist = cache, self.mask[:B, :L].clone()
        self.live = 0

    def _run(self):
        out = self.policy.lm(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos, cache=self.cache,
                             use_cache=True)
        if self.out is None:
            self.out = out.last_hidden_state
        else:
            self.out.copy_(out.last_hidden_state)

    def _capture(self):
        """Record one decode forward as a CUDA graph (warmed up on a side stream, as torch asks). The warm-up and
        the capture each advance the cache's counters and write a column: both are rewound. Out of memory is the
        training loop's to handle (train.Retry halves the rows), not a reason to give up graphs."""
        started, lengths = time.perf_counter(), [layer.cumulative_length.clone() for layer in self.cache.layers]
        before = None
        try:
            before = torch.cuda.current_stream()
            stream = torch.cuda.Stream()
            stream.wait_stream(before)
            with torch.cuda.stream(stream):
                self._run()
            before.wait_stream(stream)
            for layer, c in zip(self.cache.layers, lengths):
                layer.cumulative_length.copy_(c)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._run()
            self.graph = graph
            torch.cuda.synchronize()
            counters["captures"] += 1
            counters["capture_seconds"] += time.perf_counter() - started
        except Exception as e:  # noqa: BLE001 - any failure to capture: eager static steps from here on
            oom = next((x for x in (e, e.__context__) if isinstance(x, torch.OutOfMemoryError)), None)
            if oom is not None:  # in the warm-up, or inside the capture (then capture_end fails after it)
                raise oom
            global graphs_failed
            why = [f"{type(x).__name__}: {str(x)[:200]}" for x in (e.__context__, e) if x is not None]
            # an op that failed inside the capture (its cause, first) makes capture_end fail too
            graphs_failed = f"CUDA graph capture failed ({'; then '.join(why)})"
            print(f"warning: {graphs_failed}; decoding without graphs for the rest of this process")
            self.graphs, self.graph = False, None
        finally:
            # a failed capture_end skips torch.cuda.graph's own restore: every later kernel (the eager steps, the
            # training) would run on the capture stream, and memory cached on the default one sit unused
            if before is not None:
                torch.cuda.set_stream(before)
            for layer, c in zip(self.cache.layers, lengths):
                layer.cumulative_length.copy_(c)
