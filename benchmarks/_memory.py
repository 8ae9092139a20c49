"""Peak memory of one call, the way every benchmark here measures it.

Peak memory (:func:`peak_memory`), what is measured exactly:

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``torch.cuda.memory_allocated()`` before the call: the largest number of bytes held by live tensors of the
  caching allocator during the call, above what was live before it (cache reserve and fragmentation excluded).
* CPU, ``torch_alloc``: the same quantity for the CPU allocator, reconstructed from the allocation and free
  events that ``torch.profiler`` records with ``profile_memory=True`` (every ``[memory]`` event, sorted by time,
  running sum, maximum). Counts tensor storage only (not the Python heap, not allocations made by libraries
  outside the torch allocator), ignores whether pages were ever touched.
* CPU, ``rss_hwm``: increase of the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``,
  reset by writing ``5`` to ``/proc/self/clear_refs``) over the resident set before the call: physical memory
  first touched during the call. Includes every allocation in the process; memory reused from malloc's free
  lists does not show up; ``None`` where the kernel does not allow the reset. Taken during the same (profiled)
  call as ``torch_alloc``.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path
from typing import Callable, Optional

import torch


def _status_kb(field: str) -> Optional[int]:
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


_PROFILER_WARM = False


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_memory(fn: Callable[[], object], device="cpu") -> dict:
    """Peak extra memory of one call of ``fn()``: ``{method: bytes or None}`` (methods in the module doc).

    ``fn`` runs once. On CPU both measurements come from that one call, made under ``torch.profiler``; the
    RSS figure therefore also holds the profiler's own event buffers (small: kilobytes per thousand ops).
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return {"cuda_alloc": torch.cuda.max_memory_allocated(device) - before}
    from torch.profiler import ProfilerActivity, profile

    global _PROFILER_WARM
    if not _PROFILER_WARM:                 # the profiler's one-time set-up would count as the call's memory
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
            torch.empty(1).add_(1)
        _PROFILER_WARM = True
    hwm_ok = _reset_hwm()
    rss_before = _status_kb("VmRSS")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    hwm = _status_kb("VmHWM")
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    rss = max(0, hwm - rss_before) * 1024 if hwm_ok and hwm is not None and rss_before is not None else None
    return {"torch_alloc": peak, "rss_hwm": rss}


MEMORY_METHODS = {
    "cuda_alloc": "torch.cuda.max_memory_allocated minus memory_allocated before the call",
    "torch_alloc": "peak live bytes of the torch CPU allocator above the bytes live before the call "
                   "(torch.profiler profile_memory events)",
    "rss_hwm": "rise of the process RSS high-water mark (VmHWM after /proc/self/clear_refs) over RSS before",
}
