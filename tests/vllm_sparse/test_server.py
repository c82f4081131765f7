"""`vllm-sparse serve` with the sparse backend, driven by the official openai client."""

import concurrent.futures as cf

import openai
import pytest
import requests

from llm_utils import serve, sparse_json
from vllm_sparse.assets import data

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--attention-backend", "CUSTOM", "--enforce-eager", "--max-model-len", "8192",
            "--served-model-name", "smollm2", "--additional-config", sparse_json(dense_below=256)]
    with serve(smollm2_dir, *args, log_path=log) as (base, proc):
        yield base, proc, log
    assert not proc.needed_kill, "server did not stop within 30 s of SIGTERM"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_completion_and_chat(client):
    essay = data.essays_text()[:3000]
    # ignore_eos: in float32 on an AVX2-only CPU the model ends this answer after 15 tokens (stock's
    # kernel path and the plugin's alike), so the count is pinned, not left to the machine's rounding
    out = client.completions.create(model="smollm2", prompt=essay + "\n\nIn one sentence, the essay says",
                                    max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens > 500 and out.usage.completion_tokens == 16 and out.choices[0].text.strip()
    # "What is the capital of France?" gets "L'Étoile, la Marseillaise," from stock vLLM itself in bf16
    # on an AMX CPU (and from the plugin, which runs the same kernel there); this wording gets
    # "The capital of France is Paris." from stock and plugin in bf16 (AMX and vec) and float32
    chat = client.chat.completions.create(model="smollm2", max_tokens=12, temperature=0,
                                          messages=[{"role": "user", "content": "Name the capital of France."}])
    assert "paris" in chat.choices[0].message.content.lower()


def test_streaming(client):
    stream = client.chat.completions.create(model="smollm2", max_tokens=20, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": "Count from one to five."}])
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 3 and "".join(pieces).strip()


def test_sixteen_concurrent_requests(client):
    essay = data.essays_text()

    def one(i):
        prompt = essay[i * 2000 : i * 2000 + 1200 + 100 * i]
        return client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0)

    with cf.ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(one, range(16)))
    assert all(o.usage.completion_tokens == 8 for o in outs)


def test_malformed_request_then_server_keeps_serving(server, client):
    base = server[0]
    r = requests.post(base + "/v1/completions", data="{not json", headers={"Content-Type": "application/json"},
                      timeout=30)
    assert 400 <= r.status_code < 500
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm2", prompt="hi", max_tokens=-3)
    ok = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert ok.usage.completion_tokens == 4


def test_sparsity_counters_on_metrics(server, client):
    client.completions.create(model="smollm2", prompt=data.essays_text()[:4000], max_tokens=8, temperature=0)
    text = requests.get(server[0] + "/metrics", timeout=30).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("vllm_sparse:") and "_created" not in line}
    assert values["vllm_sparse:decode_steps_total"] > 0
    assert 0 < values["vllm_sparse:attended_tokens_total"] < values["vllm_sparse:context_tokens_total"]


def test_bad_settings_stop_the_server_at_start_up(smollm2_dir, tmp_path):
    log = tmp_path / "bad.log"
    with pytest.raises(RuntimeError, match="exited"):
        with serve(smollm2_dir, "--attention-backend", "CUSTOM", "--enforce-eager", "--additional-config",
                   sparse_json(alpha=0), log_path=log, timeout=240):
            pass
    assert "vllm_sparse setting alpha=0 is invalid; allowed: a number with 0 < alpha <= 1" in log.read_text()
