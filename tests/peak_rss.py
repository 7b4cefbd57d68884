"""Peak resident memory of a block, sampled by a thread: how tests/_fsdp_sync_worker.py and benchmarks/sync.py
measure the extra memory of a streaming weight sync (a public helper of the tests: the benchmark imports it).

    with PeakRSS() as mem:
        sync_weights(...)
    mem.extra  # bytes: highest RSS seen during the block minus RSS at its start

Linux only (reads /proc/self/statm). Resident memory drops only when freed tensors go back to the OS: run with
``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc serves allocations above 128 KiB by mmap and unmaps them on free.
"""

from __future__ import annotations

import os
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest resident set size seen by a sampling thread (every 2 ms) while the block runs, minus the start."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.base
