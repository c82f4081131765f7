"""Sparsity figures: how many KV tokens decode steps attend, against the context they hold.

The metadata builder calls :func:`record_step` once per decode step (the budget is the same
for every layer, so the per-layer figure is the step's figure). The totals are

* logged every ``VLLM_SPARSE_LOG_INTERVAL`` seconds (default 10) on vLLM's logger as
  ``vllm-sparse: … attended X% of context …``;
* exported as Prometheus counters, which vLLM's ``/metrics`` endpoint serves when the
  server runs with a multiprocess Prometheus directory (``vllm-sparse serve`` sets one up):
  ``vllm_sparse:decode_steps_total``, ``vllm_sparse:decode_requests_total``,
  ``vllm_sparse:attended_tokens_total`` and
  ``vllm_sparse:context_tokens_total`` (attended fraction = attended / context);
* readable in-process with :func:`snapshot`.
"""

from __future__ import annotations

import logging
import os
import threading
import time

# a child of vLLM's logger, so it shares vLLM's handler and format
logger = logging.getLogger("vllm.sparse")

_lock = threading.Lock()
_totals = {"decode_steps": 0, "requests": 0, "attended_tokens": 0, "context_tokens": 0}
_window = dict(_totals)
_last_log = time.monotonic()
_counters = None


def _prometheus_counters():
    global _counters
    if _counters is None:
        try:
            from prometheus_client import Counter
        except ImportError:  # pragma: no cover - prometheus_client ships with vLLM
            _counters = {}
            return _counters
        _counters = {
            "decode_steps": Counter("vllm_sparse:decode_steps", "Decode steps planned by vllm-sparse"),
            "requests": Counter("vllm_sparse:decode_requests", "Decode requests, summed over steps"),
            "attended_tokens": Counter("vllm_sparse:attended_tokens",
                                       "KV tokens attended per KV head, summed over decode requests and steps"),
            "context_tokens": Counter("vllm_sparse:context_tokens",
                                      "Context tokens held, summed over decode requests and steps"),
        }
    return _counters


def _log_interval() -> float:
    return float(os.environ.get("VLLM_SPARSE_LOG_INTERVAL", "10"))


def record_step(num_requests: int, attended_tokens: int, context_tokens: int) -> None:
    """Add one decode step: its request count and the sums over them of tokens attended and context length."""
    global _last_log
    step = {"decode_steps": 1, "requests": num_requests, "attended_tokens": attended_tokens,
            "context_tokens": context_tokens}
    with _lock:
        for k, v in step.items():
            _totals[k] += v
            _window[k] += v
        for k, c in _prometheus_counters().items():
            c.inc(step[k])
        now = time.monotonic()
        if now - _last_log < _log_interval():
            return
        w, seconds = dict(_window), now - _last_log
        for k in _window:
            _window[k] = 0
        _last_log = now
    logger.info(
        "vllm-sparse: %d decode steps in the last %.0f s attended %.1f%% of context "
        "(%.0f of %.0f tokens per request on average)",
        w["decode_steps"], seconds, 100.0 * w["attended_tokens"] / max(1, w["context_tokens"]),
        w["attended_tokens"] / max(1, w["requests"]), w["context_tokens"] / max(1, w["requests"]),
    )


def snapshot() -> dict[str, float]:
    """Totals since process start, plus ``attended_fraction``."""
    with _lock:
        out: dict[str, float] = dict(_totals)
    out["attended_fraction"] = out["attended_tokens"] / max(1, out["context_tokens"])
    return out
