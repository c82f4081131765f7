"""Ray Serve LLM: sparse-attention replicas behind one OpenAI endpoint (``vllm_sparse.serve``).

The slow tests start ``vllm-sparse ray-serve`` (our CLI: a local Ray instance, Serve, two SmolLM2
replicas on CPU) once per module and drive it with the official ``openai`` client.
"""

import concurrent.futures as cf
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

ray = pytest.importorskip("ray")

from llm_utils import DTYPE, free_port, serve_load  # noqa: E402
from vllm_sparse.assets import data  # noqa: E402
from vllm_sparse.serve import app_builder, build_app, core_sets, llm_config  # noqa: E402

APP = "vllm-sparse"
SPARSE = {"dense_below": 256}  # prompts above 256 tokens decode sparsely


# -- fast: configuration and validation, no Ray cluster ----------------------------------------------------
@pytest.mark.parametrize("sparse, engine, match", [
    ({"alpha": 2.0}, {}, "alpha"),
    ({"policy": "no-such-policy"}, {}, "policy"),
    ({"evict": "streaming"}, {}, "enable_prefix_caching"),
    ({"alpha": 0.5}, {"attention_backend": "CPU_ATTN"}, "attention_backend"),
    (None, {"model": "x"}, "model"),
])
def test_bad_settings_fail_in_the_driver_before_any_actor(sparse, engine, match):
    with pytest.raises(ValueError, match=match):
        build_app("/does/not/matter", num_replicas=2, sparse=sparse, engine_kwargs=engine)
    assert not ray.is_initialized()


def test_bad_settings_fail_from_the_command_line_before_ray_starts():
    exe = Path(sys.executable).with_name("vllm-sparse")
    out = subprocess.run([str(exe), "ray-serve", "/does/not/matter", "--num-replicas", "2",
                          "--attention-backend", "CUSTOM", "--additional-config",
                          json.dumps({"vllm_sparse": {"k": -1}})], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "vllm_sparse setting k=-1 is invalid" in out.stderr
    assert "Started a local Ray instance" not in out.stdout + out.stderr


def test_llm_config_on_the_cpu_build():
    cfg = llm_config("/models/smollm2", num_replicas=3, sparse={"alpha": 0.4}, kv_cache_space_gib=1.5,
                     engine_kwargs={"max_model_len": 4096}, tensor_parallel_size=2)
    assert cfg.model_id == "smollm2" and cfg.deployment_config["num_replicas"] == 3
    assert cfg.engine_kwargs["attention_backend"] == "CUSTOM"
    assert cfg.engine_kwargs["additional_config"] == {"vllm_sparse": {"alpha": 0.4}}
    assert cfg.engine_kwargs["tensor_parallel_size"] == 2
    assert cfg.accelerator_config.kind == "cpu"
    assert cfg.placement_group_config["bundles"] == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert cfg.runtime_env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "1.5"
    assert cfg.deployment_config["ray_actor_options"]["num_cpus"] == 0
    # what each replica receives travels through Ray's serializer
    again = ray.cloudpickle.loads(ray.cloudpickle.dumps(cfg))
    assert again.engine_kwargs == cfg.engine_kwargs


def test_app_builder_parses_serve_run_arguments():
    # `serve run vllm_sparse.serve:app_builder key=value ...` hands over strings
    try:  # building the application starts a local Ray instance (Serve reads its runtime context)
        app = app_builder({"model": "/models/smollm2", "num_replicas": "2", "sparse": '{"alpha": 0.5}',
                           "engine_kwargs": '{"max_model_len": 2048}'})
        assert type(app).__name__ == "Application"
    finally:
        ray.shutdown()
    with pytest.raises(ValueError, match="sparse must be a JSON object"):
        app_builder({"model": "m", "sparse": "{alpha"})
    with pytest.raises(ValueError, match="unknown app_builder argument"):
        app_builder({"model": "m", "replicas": "2"})
    with pytest.raises(ValueError, match="alpha"):
        app_builder({"model": "m", "sparse": '{"alpha": 0}'})


def test_serve_yaml_example_builds(tmp_path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    spec = yaml.safe_load((Path(__file__).parents[2] / "examples" / "ray_serve.yaml").read_text())
    ServeDeploySchema.model_validate(spec)  # what `serve run`/`serve deploy` check first
    (entry,) = spec["applications"]
    assert entry["import_path"] == "vllm_sparse.serve:app_builder"
    cfg = llm_config("/m", **{k: v for k, v in entry["args"].items() if k not in ("model", "sparse")},
                     sparse=entry["args"]["sparse"])
    assert cfg.engine_kwargs["additional_config"]["vllm_sparse"] == {"alpha": 0.5, "k": 12}


def test_autoscaling_instead_of_a_fixed_count():
    cfg = llm_config("/m", num_replicas=None, autoscaling={"min_replicas": 1, "max_replicas": 4})
    assert cfg.deployment_config["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4}
    assert "num_replicas" not in cfg.deployment_config
    with pytest.raises(ValueError, match="either num_replicas or autoscaling"):
        llm_config("/m", num_replicas=2, autoscaling={"max_replicas": 4})


def test_core_sets_are_disjoint_per_replica():
    cores = list(range(8))
    sets = [core_sets(cores, r, ranks=2, replicas=2) for r in range(2)]
    assert sets == ["0,1|2,3", "4,5|6,7"]
    assert [core_sets([0, 1], r, ranks=1, replicas=2) for r in range(2)] == ["0", "1"]
    assert core_sets([0, 1], 2, ranks=1, replicas=3) == "0"  # more workers than cores: shared


# -- slow: a real local Ray cluster, two replicas ----------------------------------------------------------
def _start(model, port, log):
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")}
    env["RAY_DEDUP_LOGS"] = "0"  # every replica's request log reaches the driver's output
    exe = Path(sys.executable).with_name("vllm-sparse")
    cmd = [str(exe), "ray-serve", str(model), "--num-replicas", "2", "--kv-cache-space-gib", "1",
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "smollm2",
           "--attention-backend", "CUSTOM", "--additional-config", json.dumps({"vllm_sparse": SPARSE}),
           "--max-model-len", "4096", "--enforce-eager", "--dtype", DTYPE]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.fixture(scope="module")
def cluster(smollm2_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("ray_serve") / "ray-serve.log"
    port = free_port()
    with open(log_path, "w") as log:
        proc = _start(smollm2_dir, port, log)
        deadline, address = time.monotonic() + 480, None
        while time.monotonic() < deadline and address is None:
            if proc.poll() is not None:
                pytest.fail(f"ray-serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            m = re.search(r"vllm-sparse ray-serve: serving smollm2 at (\S+) .*Ray at (\S+)\)", log_path.read_text())
            address = m and (m.group(1), m.group(2))
            time.sleep(1)
        assert address, f"ray-serve not ready in 480 s:\n{log_path.read_text()[-3000:]}"
        ray.init(address=address[1], namespace="serve", log_to_driver=False)
        state = {"base": address[0], "proc": proc, "log": log_path, "engine_pids": set()}
        try:
            yield state
        finally:
            ray.shutdown()
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def _client(cluster):
    return openai.OpenAI(base_url=cluster["base"], api_key="unused", max_retries=0, timeout=300)


def _replicas():
    """Alive LLM replica actors: ``{replica id: pid}`` from Ray's own actor table (the GCS's).

    (``ray.util.state`` would need the dashboard, which ``ray-serve`` does not start.)
    """
    from ray._private.state import actors

    return {a["Name"].rsplit("#", 1)[-1]: a["Pid"] for a in actors().values()
            if a["State"] == "ALIVE" and a["ActorClassName"].startswith(f"ServeReplica:{APP}:LLMServer")}


def _engine_children(pid):
    import psutil

    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _alive(pid):
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _served_by(log_text):
    """Requests each replica answered, from the replicas' request logs (``CALL <method> OK``)."""
    counts = {}
    for rid in re.findall(rf"{APP}_LLMServer:smollm2 (\w+) \S+ -- CALL \w+ OK", log_text):
        counts[rid] = counts.get(rid, 0) + 1
    return counts


def _one_request(client, i, essay):
    kind = i % 3
    if kind == 0:  # completion over a long prompt: sparse decode
        out = client.completions.create(model="smollm2", prompt=essay[i * 900 : i * 900 + 1500 + 40 * i],
                                        max_tokens=8, temperature=0)
        return out.usage.completion_tokens == 8 and out.usage.prompt_tokens > 256
    if kind == 1:
        out = client.chat.completions.create(model="smollm2", max_tokens=8, temperature=0, messages=[
            {"role": "user", "content": f"Name a colour. Request {i}."}])
        return bool(out.choices[0].message.content.strip())
    stream = client.chat.completions.create(model="smollm2", max_tokens=8, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": f"Count to three ({i})."}])
    return len([c for c in stream if c.choices and c.choices[0].delta.content]) > 1


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.ray
def test_two_replicas_answer_32_concurrent_requests(cluster):
    replicas = _replicas()
    assert len(replicas) == 2, replicas
    for pid in replicas.values():
        cluster["engine_pids"] |= _engine_children(pid) | {pid}
    client, essay = _client(cluster), data.essays_text()
    before = _served_by(cluster["log"].read_text())
    with cf.ThreadPoolExecutor(32) as pool:
        ok = list(pool.map(lambda i: _one_request(client, i, essay), range(32)))
    assert all(ok)
    time.sleep(2)  # replica logs reach the driver's output asynchronously
    after = _served_by(cluster["log"].read_text())
    served = {rid: after.get(rid, 0) - before.get(rid, 0) for rid in replicas}
    assert sum(served.values()) == 32 and all(n > 0 for n in served.values()), served


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.ray
def test_killed_replica_is_replaced_and_the_service_keeps_answering(cluster):
    from ray import serve

    replicas = _replicas()
    victim_id, victim_pid = sorted(replicas.items())[0]
    victim_tree = _engine_children(victim_pid)
    assert victim_tree, "the replica runs its engine in child processes"
    client, essay = _client(cluster), data.essays_text()
    results, stop = [], threading.Event()

    def keep_asking():
        i = 0
        while not stop.is_set():
            t = time.monotonic()
            try:
                results.append((t, _one_request(client, i, essay)))
            except openai.APIError:
                results.append((t, False))
            i += 1

    threads = [threading.Thread(target=keep_asking) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(3)
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#LLMServer:smollm2#{victim_id}", namespace="serve"),
             no_restart=True)
    try:
        # Serve replaces the dead replica: two RUNNING again, one of them new, in bounded time
        deadline, back = killed_at + 300, None
        while time.monotonic() < deadline:
            now = _replicas()
            status = serve.status().applications[APP].deployments["LLMServer:smollm2"]
            if len(now) == 2 and victim_id not in now and status.replica_states.get("RUNNING") == 2:
                back = time.monotonic() - killed_at
                break
            time.sleep(2)
        assert back is not None, f"replica not replaced within 300 s: {now}, {status}"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
    # the service kept answering: requests sent after the kill succeeded, before the replacement was up
    # (a request in flight on the killed replica fails with it: at most one per sender thread)
    after_kill = [ok for t, ok in results if t > killed_at + 5]
    assert len(after_kill) >= 2 and all(after_kill), results
    assert sum(not ok for _, ok in results) <= len(threads), results
    # the killed replica's engine processes did not outlive it
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(p) for p in victim_tree | {victim_pid}):
        time.sleep(1)
    assert not any(_alive(p) for p in victim_tree | {victim_pid}), "orphaned engine processes"
    for pid in _replicas().values():
        cluster["engine_pids"] |= _engine_children(pid) | {pid}
    failed = sum(not ok for _, ok in results)
    print(f"replica replaced in {back:.0f} s; {len(results)} requests meanwhile, {failed} failed (in flight at the kill)")


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_stops_everything(cluster):
    """SIGTERM, as a service manager sends it: exit 0, no abort, and nothing left of the Ray cluster
    (replicas, their engines, Ray's GCS, raylet, DashboardAgent, RuntimeEnvAgent). It used to exit
    134: ray.init's own SIGTERM handler (`sys.exit(15)`) replaced ours and cut the stop short."""
    proc, pids = cluster["proc"], set(cluster["engine_pids"])
    assert pids
    ray.shutdown()
    row = serve_load.stop_with_sigterm(proc, cluster["log"], timeout=120, grace=60)
    assert row["ok"], row
    assert not [p for p in pids if _alive(p)], "processes left behind after ray-serve stopped"
    assert "vllm-sparse ray-serve: shutting down" in cluster["log"].read_text()
