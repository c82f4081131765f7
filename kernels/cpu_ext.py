"""The fused CPU kernels (``cpu_select.cpp``), compiled with torch's ``cpp_extension`` on first use.

Three ops, each one call per layer, replacing chains of small torch ops whose dispatch cost
dominates a CPU decode step:

* ``update_page_summaries(key, slots, rows, summary_offset, block_size, page_size)`` — the twin of
  :func:`.reference.update_page_summaries`;
* ``quest_select(query, rows, summary_offset, block_table, seq_lens, count, candidates, forced_lo,
  forced_hi, block_size, rescore_dims, amx, table, keep=None, prior=None, prior_candidates=None)`` —
  Quest's page ranking (and the ``exact_pages`` rescoring of ``candidates`` pages over
  ``rescore_dims`` dims) into a compacted one-head block table, skipping the rows ``keep`` marks;
  the rows ``prior`` marks rescore ``prior_candidates`` pages plus those already in their table
  row (a refresh). Its torch twins are :func:`.cpu_select.select_pages_reference`,
  :func:`.ranking.exact_pages` and :func:`.ranking.refresh_pages`;
* ``reuse_rows(query, num_kv_heads, prev_table, rows, keep, width, grown_mask=None, grown_new=None,
  prev_ref=None, min_similarity=0.0, refresh=False)`` -> ``[table, keep, prior, unit queries]`` — the
  rows of a ``reselect_every`` step that may keep last step's pages, and the ``reselect_similarity``
  gate (empty ``prior`` / queries where not asked for); the twin of
  :func:`.cpu_select.reuse_rows_reference`.

The build is cached under torch's extension directory (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), keyed by the source, the flags and this CPU's model, so it runs
once per machine (about 30 s). It needs ``g++`` and ``ninja`` (both come with the ``cpu``
extra's vLLM); without them :func:`load` raises a ``RuntimeError`` that says so. Never imports vLLM.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path

__all__ = ["load"]

_SOURCE = Path(__file__).with_name("cpu_select.cpp")


def _cpu_tag() -> str:
    """Short hash of this CPU's model and flags: ``-march=native`` builds must not travel between CPUs."""
    text = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        text += "".join(line for line in info.splitlines() if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]


@functools.lru_cache(maxsize=None)
def load():
    """The compiled extension module (built on the first call of the process, cached on disk)."""
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load(
            name=f"vllm_sparse_cpu_{_cpu_tag()}",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # compiler, ninja or headers missing: say what is needed
        raise RuntimeError(
            f"vllm-sparse could not build its CPU kernels ({_SOURCE.name}) with torch.utils.cpp_extension: {e}. "
            "The CPU path needs a C++ compiler (g++, e.g. `apt-get install g++`) and ninja (`pip install ninja`)."
        ) from e
