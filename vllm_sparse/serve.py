"""Scale out on Ray Serve LLM: N replicas of a sparse-attention vLLM engine behind one OpenAI endpoint.

Ray 2.60's ``ray.serve.llm`` runs one vLLM ``AsyncLLM`` per replica and routes OpenAI requests
(``/v1/completions``, ``/v1/chat/completions``, streaming) across them. Its ``engine_kwargs``
reach vLLM's ``AsyncEngineArgs`` unchanged, so ``attention_backend="CUSTOM"`` and
``additional_config={"vllm_sparse": {...}}`` work as they do with ``vllm serve``, and every
replica loads the plugin from its entry points. This module adds what a sparse deployment needs
on top:

* the sparse settings are validated **in the driver** (:class:`~vllm_sparse.config.SparseConfig`),
  so a bad value fails before any actor starts;
* on the CPU build, replicas run without GPUs: ``accelerator_config={"kind": "cpu"}`` (without it
  Serve asks for GPU bundles and the replicas stay pending forever), one CPU bundle per engine
  worker, zero-CPU reservations for the replica and ingress actors (their work is I/O), a KV-cache
  size per replica through ``runtime_env.env_vars`` (``VLLM_CPU_KVCACHE_SPACE``; without it each
  engine claims most of the machine's memory and the second one fails) and a disjoint core set
  per replica (:class:`ReplicaCpuBinding`, ``VLLM_CPU_OMP_THREADS_BIND``);
* eviction's start-up requirements (no prefix caching) are checked before any actor starts.

Three ways in::

    # Python
    from ray import serve
    from vllm_sparse.serve import build_app
    serve.run(build_app("/path/to/model", num_replicas=2, sparse={"alpha": 0.5}))

    # Ray's CLI and Serve YAML configs (``import_path: vllm_sparse.serve:app_builder``)
    serve run vllm_sparse.serve:app_builder model=/path/to/model num_replicas=2 sparse='{"alpha": 0.5}'

    # our CLI, mirroring ``vllm serve`` (``vllm_sparse.cli.ray_serve``)
    vllm-sparse ray-serve /path/to/model --num-replicas 2 --attention-backend CUSTOM \\
        --additional-config '{"vllm_sparse": {"alpha": 0.5}}' --max-model-len 8192 --enforce-eager

Tensor parallelism: ``tensor_parallel_size=N`` gives each replica N engine workers (one bundle
each). On GPUs Serve runs them on vLLM's Ray executor; on the CPU platform vLLM's Ray executor
does not run (``CpuPlatform.ray_device_key`` is empty), so Serve uses the ``mp`` executor inside
the replica. Each rank's attention layers see only that rank's KV heads, so selection and page
summaries are per rank by construction; the blocks eviction frees depend only on positions and
settings, which every rank has identically.

Importing this module does not import Ray or vLLM; :func:`build_app` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from vllm_sparse.cpu_tuning import is_cpu_build
from vllm_sparse.config import CONFIG_KEY, SparseConfig

#: engine arguments set unless the caller sets them (the plugin's backend)
DEFAULT_ENGINE_KWARGS: dict[str, Any] = {"attention_backend": "CUSTOM"}
#: GiB of KV cache per replica on the CPU build when neither the caller nor the environment says
DEFAULT_CPU_KVCACHE_GIB = 4.0


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return value


def validate(sparse: Mapping[str, Any] | None, engine_kwargs: Mapping[str, Any]) -> SparseConfig:
    """Check what would otherwise fail inside every replica; raise ``ValueError`` naming the setting."""
    config = SparseConfig.from_dict(sparse)
    if "model" in engine_kwargs or "served_model_name" in engine_kwargs:
        raise ValueError("engine_kwargs must not contain 'model' or 'served_model_name': pass the model "
                         "as build_app's first argument and served_model_name=... as a keyword")
    if config.evict is not None and engine_kwargs.get("enable_prefix_caching", None) is not False:
        raise ValueError(f"vllm_sparse setting evict={config.evict!r} needs prefix caching off: pass "
                         "engine_kwargs={'enable_prefix_caching': False} (--no-enable-prefix-caching)")
    backend = engine_kwargs.get("attention_backend", "CUSTOM")
    if backend != "CUSTOM" and sparse:
        raise ValueError(f"vllm_sparse settings were given but attention_backend={backend!r}: the sparse "
                         "backend runs only with attention_backend='CUSTOM'")
    return config


def llm_config(model: str, *, served_model_name: str | None = None, num_replicas: int | None = 1,
               autoscaling: Mapping[str, Any] | None = None, sparse: Mapping[str, Any] | None = None,
               engine_kwargs: Mapping[str, Any] | None = None, tensor_parallel_size: int = 1,
               kv_cache_space_gib: float | None = None, cpus_per_worker: float = 1.0,
               bind_cores: bool = True, runtime_env: Mapping[str, Any] | None = None,
               deployment_config: Mapping[str, Any] | None = None):
    """The :class:`ray.serve.llm.LLMConfig` of one sparse-attention model (see :func:`build_app`)."""
    from ray.serve.llm import LLMConfig

    engine = {**DEFAULT_ENGINE_KWARGS, **dict(engine_kwargs or {})}
    additional = dict(engine.get("additional_config") or {})
    if sparse is not None and CONFIG_KEY in additional and dict(additional[CONFIG_KEY]) != dict(sparse):
        raise ValueError(f"sparse settings given twice (sparse=... and engine_kwargs['additional_config']"
                         f"[{CONFIG_KEY!r}]) with different values; pass them once")
    settings = dict(sparse) if sparse is not None else additional.get(CONFIG_KEY)
    validate(settings, engine)
    if settings is not None:
        additional[CONFIG_KEY] = dict(settings)
    if additional:
        engine["additional_config"] = additional
    tp = _positive_int("tensor_parallel_size", tensor_parallel_size)
    engine["tensor_parallel_size"] = tp

    deployment: dict[str, Any] = dict(deployment_config or {})
    if autoscaling is not None:
        if num_replicas not in (None, 1):
            raise ValueError("pass either num_replicas or autoscaling, not both")
        deployment["autoscaling_config"] = dict(autoscaling)
    else:
        deployment["num_replicas"] = _positive_int("num_replicas", num_replicas)

    env = dict((runtime_env or {}).get("env_vars", {}))
    kwargs: dict[str, Any] = {}
    callback = None
    if is_cpu_build():
        if kv_cache_space_gib is None:
            kv_cache_space_gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB))
        if not kv_cache_space_gib > 0:
            raise ValueError(f"kv_cache_space_gib must be > 0 (GiB per replica); got {kv_cache_space_gib!r}")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_space_gib:g}")
        kwargs["accelerator_config"] = {"kind": "cpu"}
        kwargs["placement_group_config"] = {"bundles": [{"CPU": cpus_per_worker}] * tp}
        # the replica actor only relays requests to its engine process: reserve nothing for it
        actor = dict(deployment.get("ray_actor_options") or {})
        actor.setdefault("num_cpus", 0)
        deployment["ray_actor_options"] = actor
        if bind_cores and "VLLM_CPU_OMP_THREADS_BIND" not in env and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            callback = {"callback_class": "vllm_sparse.serve:ReplicaCpuBinding",
                        "callback_kwargs": {"ranks_per_replica": tp}}
    elif kv_cache_space_gib is not None:
        raise ValueError("kv_cache_space_gib applies to the CPU build only; on GPUs use "
                         "engine_kwargs={'gpu_memory_utilization': ...}")
    rt = {**dict(runtime_env or {}), "env_vars": env} if env else dict(runtime_env or {})

    return LLMConfig(
        model_loading_config={"model_id": served_model_name or os.path.basename(os.path.normpath(model)) or model,
                              "model_source": model},
        engine_kwargs=engine,
        deployment_config=deployment,
        runtime_env=rt or None,
        callback_config=callback or {},
        # Ray's extra Prometheus logger for engine stats; vLLM's own /metrics is unaffected
        log_engine_metrics=False,
        **kwargs,
    )


def build_app(model: str, *, served_model_name: str | None = None, num_replicas: int | None = 1,
              autoscaling: Mapping[str, Any] | None = None, sparse: Mapping[str, Any] | None = None,
              engine_kwargs: Mapping[str, Any] | None = None, tensor_parallel_size: int = 1,
              kv_cache_space_gib: float | None = None, cpus_per_worker: float = 1.0, bind_cores: bool = True,
              runtime_env: Mapping[str, Any] | None = None, deployment_config: Mapping[str, Any] | None = None):
    """A Ray Serve application: ``num_replicas`` sparse-attention engines behind one OpenAI endpoint.

    Args:
        model: local path or Hugging Face id.
        served_model_name: the ``model`` name clients send (default: the path's last component).
        num_replicas: fixed number of replicas, or ``autoscaling`` (Serve's ``autoscaling_config``:
            ``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, …) instead.
        sparse: the plugin's settings (``additional_config["vllm_sparse"]``); validated here.
        engine_kwargs: any other ``AsyncEngineArgs``/frontend field (``max_model_len``,
            ``enforce_eager``, ``dtype``, …); ``attention_backend`` defaults to ``"CUSTOM"``.
        tensor_parallel_size: engine workers per replica.
        kv_cache_space_gib: CPU build only: KV cache per replica (default
            ``$VLLM_CPU_KVCACHE_SPACE`` or 4 GiB).
        cpus_per_worker: CPU build only: the Ray reservation of each engine worker.
        bind_cores: CPU build only: give each replica its own cores (:class:`ReplicaCpuBinding`)
            unless ``VLLM_CPU_OMP_THREADS_BIND`` is set.
        runtime_env, deployment_config: passed to Serve (``env_vars`` are merged with ours).
    Raises:
        ValueError: naming the bad setting, before any Ray actor starts.
    """
    config = llm_config(model, served_model_name=served_model_name, num_replicas=num_replicas,
                        autoscaling=autoscaling, sparse=sparse, engine_kwargs=engine_kwargs,
                        tensor_parallel_size=tensor_parallel_size, kv_cache_space_gib=kv_cache_space_gib,
                        cpus_per_worker=cpus_per_worker, bind_cores=bind_cores, runtime_env=runtime_env,
                        deployment_config=deployment_config)
    return openai_app(config)


def openai_app(config):
    """Serve's OpenAI application over one :func:`llm_config` (starts a local Ray if none is running)."""
    from ray.serve.llm import build_openai_app

    # the ingress only relays requests to the replicas: one, reserving no CPU on the CPU build
    ingress = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}} if is_cpu_build() else {}
    return build_openai_app({"llm_configs": [config], "ingress_deployment_config": ingress})


def as_mapping(name: str, value: Any) -> dict | None:
    if value is None or isinstance(value, Mapping):
        return None if value is None else dict(value)
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name} must be a JSON object; got {value!r} ({e})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{name} must be a JSON object; got {value!r}")
    return parsed


def _as_number(name: str, value: Any, kind=int):
    if value is None or isinstance(value, kind):
        return value
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a{'n integer' if kind is int else ' number'}; got {value!r}") from None


def app_builder(args: Mapping[str, Any]):
    """Entry for ``serve run vllm_sparse.serve:app_builder key=value …`` and Serve YAML ``args``.

    Keys: ``model`` (required), ``served_model_name``, ``num_replicas``, ``autoscaling`` (JSON),
    ``sparse`` (JSON), ``engine_kwargs`` (JSON), ``tensor_parallel_size``, ``kv_cache_space_gib``.
    From the command line every value arrives as a string; from YAML, typed.
    """
    args = dict(args)
    allowed = {"model", "served_model_name", "num_replicas", "autoscaling", "sparse", "engine_kwargs",
               "tensor_parallel_size", "kv_cache_space_gib"}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ValueError(f"unknown app_builder argument(s) {unknown}; allowed: {sorted(allowed)}")
    if "model" not in args:
        raise ValueError("app_builder needs model=<path or Hugging Face id>")
    autoscaling = as_mapping("autoscaling", args.get("autoscaling"))
    return build_app(
        os.path.expanduser(str(args["model"])),
        served_model_name=args.get("served_model_name"),
        num_replicas=None if autoscaling else _as_number("num_replicas", args.get("num_replicas", 1)),
        autoscaling=autoscaling,
        sparse=as_mapping("sparse", args.get("sparse")),
        engine_kwargs=as_mapping("engine_kwargs", args.get("engine_kwargs")),
        tensor_parallel_size=_as_number("tensor_parallel_size", args.get("tensor_parallel_size", 1)),
        kv_cache_space_gib=_as_number("kv_cache_space_gib", args.get("kv_cache_space_gib"), float),
    )


def core_sets(n_cores: list[int], replica: int, ranks: int, replicas: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for replica ``replica``: ``ranks`` disjoint core ranges ("a-b|c-d").

    The machine's cores are split evenly over ``replicas × ranks`` engine workers; with more
    workers than cores, workers share cores round-robin (oversubscribed but never unbound).
    """
    workers = max(1, replicas) * ranks
    per = max(1, len(n_cores) // workers)
    parts = []
    for r in range(ranks):
        start = ((replica * ranks + r) * per) % len(n_cores)
        chosen = n_cores[start : start + per]
        parts.append(",".join(str(c) for c in chosen))
    return "|".join(parts)


try:  # the callback base class lives in Ray; this module must import without Ray
    from ray.llm._internal.common.callbacks.base import CallbackBase as _CallbackBase
except ImportError:  # pragma: no cover - Ray absent: build_app fails with Ray's ImportError first
    _CallbackBase = object


class ReplicaCpuBinding(_CallbackBase):  # type: ignore[misc,valid-type]
    """Serve LLM callback: before the replica's engine starts, pin it to its share of the cores.

    Runs in the replica process, which knows its rank (``serve.get_replica_context()``); the
    engine process it spawns inherits ``VLLM_CPU_OMP_THREADS_BIND``. Without this every CPU
    replica binds its OpenMP threads to the same cores.
    """

    async def on_before_node_init(self) -> None:
        from ray import serve

        ctx = serve.get_replica_context()
        rank = getattr(ctx.rank, "rank", ctx.rank)
        cores = sorted(os.sched_getaffinity(0))
        ranks = int(self.kwargs.get("ranks_per_replica", 1))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = core_sets(cores, int(rank), ranks, ctx.world_size)
