"""Peak tensor memory of one block of work, and the time trimllama's hooks take in it.

Both devices report the bytes the caller says the block starts with (weights and inputs) plus the
largest increase of live tensor bytes during the block:
CUDA: the caching allocator's `max_memory_allocated` minus `memory_allocated` at the start.
CPU: torch's profiler with `profile_memory=True` reports every CPU tensor allocation and free with the
running total of what was allocated while it ran; the largest total is the increase. The profiler slows
the block down, so it is only used on untimed runs.

Hook time (with `hook_times`): torch's profiler with its Python tracer (`with_stack=True`) records every Python
call; the time of the outermost calls into trimllama's adapters (its hooks, with the scoring, selection,
gathering and mask columns they call) is summed. The tracer slows Python down, so this overstates them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


class PeakMemory:
    """Context manager; `peak_bytes` holds the peak after the block.

    Args:
        device: where the tensors live.
        baseline_bytes: bytes of the block's own tensors that are live when it starts (weights, inputs).
        hook_times: also trace Python calls: `hook_seconds` (trimllama's hooks) and `seconds` (the whole block,
            under the same profiler).
    """

    def __init__(self, device: torch.device, baseline_bytes: int = 0, hook_times: bool = False) -> None:
        self.device = device
        self.baseline_bytes = baseline_bytes
        self.hook_times = hook_times
        self.peak_bytes = 0
        self.hook_seconds = 0.0
        self.seconds = 0.0
        self._profiler: profile | None = None
        self._start_bytes = 0
        self._started = 0.0

    def __enter__(self) -> "PeakMemory":
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_bytes = torch.cuda.memory_allocated(self.device)
        if not cuda or self.hook_times:
            self._profiler = profile(
                activities=[ProfilerActivity.CPU], profile_memory=not cuda, with_stack=self.hook_times
            )
            with _quiet_stderr():
                self._profiler.__enter__()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = self.baseline_bytes + torch.cuda.max_memory_allocated(self.device) - self._start_bytes
        self.seconds = time.perf_counter() - self._started
        if self._profiler is None:
            return
        with _quiet_stderr():
            self._profiler.__exit__(*exc_info)
        if self.device.type != "cuda":
            self.peak_bytes = self.baseline_bytes + _peak_allocated(self._profiler)
        if self.hook_times:
            self.hook_seconds = _hook_seconds(self._profiler)
        self._profiler = None


def describe_method(device: torch.device) -> str:
    """How `PeakMemory` measures on `device`, for the report."""
    tracker = (
        "torch.cuda.max_memory_allocated - memory_allocated at the start"
        if device.type == "cuda"
        else "torch profiler with profile_memory=True, CPU tensor allocations"
    )
    return (
        "weights + benchmark inputs (cross_attention_states, ids, masks, the ideal arm's kept features) "
        f"+ largest increase of live tensor bytes during the prefill and one decode step ({tracker})"
    )


def _peak_allocated(profiler: profile) -> int:
    """Largest running total of bytes allocated (and not yet freed) while the profiler ran.

    The allocator's running total is process-wide and is not decreased by frees made while no profiler runs
    (a tensor allocated in one profiled block and freed after it stays counted), so the total before the
    block's first allocation is subtracted.
    """
    events, pending = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size))
    if not events:
        return 0
    _, first_total, first_size = min(events)
    return max(total for _, total, _ in events) - (first_total - first_size)


def _hook_seconds(profiler: profile) -> float:
    """Seconds of the outermost Python calls into trimllama's adapters: its hooks, with all they call (scoring,
    selection, gathering, mask columns). Frames of the caller (the CLI, the benchmark loop) do not count."""

    def library(node) -> bool:
        return node.tag == _EventType.PyCall and "trimllama/adapters/" in node.name

    total, pending = 0, [(node, False) for node in profiler.profiler.kineto_results.experimental_event_tree()]
    while pending:
        node, inside = pending.pop()
        if library(node) and not inside:
            total += node.duration_time_ns
        pending.extend((child, inside or library(node)) for child in node.children)
    return total / 1e9


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's start/stop lines, which its C++ side writes straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
