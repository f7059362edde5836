"""Host memory hygiene for long-running CPU processes (glibc's allocator; no-ops elsewhere).

glibc keeps freed memory mapped: the few hundred MB that XLA's compiler frees, and the holes that
repeated, differently sized per-call buffers (outputs, convolution scratch) leave in its heap.
On CPU these add to the peak resident memory of every later run of the network.
"""

import ctypes
import ctypes.util
import functools

_M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h


@functools.cache
def _libc():
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
  except (OSError, TypeError):
    return None


def release_freed_memory() -> None:
  """Returns the heap's free pages to the OS (`malloc_trim`); called after each compilation."""
  if _libc() is not None:
    _libc().malloc_trim(0)


def return_large_blocks_to_os(threshold_bytes: int = 1 << 20) -> bool:
  """Serves allocations of at least `threshold_bytes` with their own mappings, freed on release.

  Process-wide (`mallopt(M_MMAP_THRESHOLD)`), so entry points call it, not the library: the
  fusion and benchmark commands do. Costs a page fault per touched page of each large
  allocation, negligible next to a network run. Returns False where unsupported.
  """
  return _libc() is not None and _libc().mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1
