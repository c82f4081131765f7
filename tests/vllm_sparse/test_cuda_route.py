"""The backend's CUDA route inside real vLLM (CPU build), emulated on CPU tensors.

``VLLM_SPARSE_EMULATE_CUDA=1`` (a test-only switch, ``vllm_sparse.backend``) makes the CPU engine's
metadata builder plan the CUDA route's metadata (no CPU op metadata, no fused CPU decode) and its
layers run ``SparseAttentionImpl._forward_cuda`` over the plugin's own cache layout (keys as
``[block_size, head_size]`` rows) in the cache vLLM's CPU model runner allocates, every op
(``ops.write_kv``, ``ops.paged_attention``, ``ops.sparse_decode`` / ``dense_decode``) running its
Triton kernels in the Triton interpreter.

What the emulation cannot reach, because it lives in vLLM's GPU-only code: the GPU model runner's
CUDA graphs (piecewise around attention, as the builder declares ``AttentionCGSupport.NEVER``), the
CUDA platform's backend validation and block-size choice, the GPU worker's memory profiling, and the
kernels' split-K merge (the interpreter runs one split; ``tests/kernels`` test the merge, and
``benchmarks/gpu_check.sh`` runs the kernels natively). The nearest real thing of the block-size
choice is tested here: the base platform's rule, which the CUDA platform inherits, on our backend.

The interpreter reads and writes raw memory: a wrong offset in the route (a mutation of
``_forward_cuda``'s prefill query offsets did this) aborts the test process rather than failing one
test; faulthandler's traceback names the test. On a GPU machine (vLLM's CUDA build) these tests skip:
the route runs natively there.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before their import

from llm_utils import essay_ids, generate_once, make_llm, preemptions

pytestmark = pytest.mark.vllm

SWITCH = "VLLM_SPARSE_EMULATE_CUDA"


def _skip_unless_cpu_build():
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("emulates the CUDA route on vLLM's CPU build; on a GPU the route runs natively")


@pytest.fixture
def emulate_cuda(monkeypatch):
    """The switch on for this test's engines (read when their builder and layers are built)."""
    _skip_unless_cpu_build()
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("TRITON_INTERPRET=1 must be set before the kernels are imported (this module sets it)")
    monkeypatch.setenv(SWITCH, "1")


class Spy:
    """Records the calls of functions that are looked up by attribute at call time (``ops.write_kv``, ...),
    keyed ``"<module or class>.<name>"``: ``None`` each, or what ``record(result, *args, **kwargs)`` returns."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.calls: dict[str, list] = {}

    def wrap(self, owner, name, record=None, key=None):
        real = getattr(owner, name)
        calls = self.calls.setdefault(key or f"{owner.__name__.rsplit('.', 1)[-1]}.{name}", [])

        def spy(*args, **kwargs):
            result = real(*args, **kwargs)
            calls.append(record(result, *args, **kwargs) if record else None)
            return result

        self.monkeypatch.setattr(owner, name, spy)
        return real

    def count(self, key) -> int:
        return len(self.calls.get(key, []))


@pytest.fixture
def route_spy(monkeypatch):
    """Which route ran: the impl's two forwards, the ops, and the Triton wrappers behind them."""
    from vllm_sparse import backend, cpu_attention
    from vllm_sparse.kernels import ops, triton_kv_write, triton_paged_attn, triton_select, triton_sparse_attn

    spy = Spy(monkeypatch)

    def batch(_, self, query, cache, md, output, dense_layer):  # what one layer call of the CUDA route saw
        nd, ndt, n = md.num_decodes, md.num_decode_tokens, md.num_actual_tokens
        q_lens = (md.query_start_loc[1:] - md.query_start_loc[:-1])[nd:]
        later_chunk = bool((md.seq_lens[nd:] > q_lens).any()) if n > ndt else False  # context already cached
        return dict(decodes=nd, prefill_tokens=n - ndt, later_chunk=later_chunk, cpu=query.device.type == "cpu",
                    layout_rows=not cache.key_transposed and not cache.amx, dense=md.decode_is_dense)

    spy.wrap(backend.SparseAttentionImpl, "_forward_cuda", batch)
    spy.wrap(backend.SparseAttentionImpl, "_forward_cpu")
    spy.wrap(cpu_attention, "write_kv")
    for name in ("write_kv", "paged_attention", "sparse_decode", "dense_decode"):
        spy.wrap(ops, name)
    spy.wrap(triton_kv_write, "write_kv_triton")
    spy.wrap(triton_paged_attn, "paged_attention_triton")
    spy.wrap(triton_select, "select_tables_triton")
    spy.wrap(triton_sparse_attn, "table_decode_triton")
    spy.wrap(triton_sparse_attn, "dense_decode_triton")
    return spy


# ---------------------------------------------------------------------------------------------- the switch
def test_the_switch_is_refused_without_the_interpreter_and_ignored_on_a_gpu(monkeypatch):
    from vllm_sparse.backend import cuda_route

    monkeypatch.delenv(SWITCH, raising=False)
    assert cuda_route(on_cpu=False) and not cuda_route(on_cpu=True)
    monkeypatch.setenv(SWITCH, "1")
    assert cuda_route(on_cpu=False)  # a GPU takes the CUDA route anyway
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=f"{SWITCH}=1 .*TRITON_INTERPRET=1"):
        cuda_route(on_cpu=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cuda_route(on_cpu=True)
    monkeypatch.setenv(SWITCH, "yes")
    with pytest.raises(ValueError, match=f"{SWITCH}='yes'"):
        cuda_route(on_cpu=True)


def test_forced_triton_refuses_kernels_compiled_for_a_gpu(monkeypatch):
    """Kernels decorated before ``TRITON_INTERPRET=1`` was set cannot run on CPU tensors: a named error."""
    from vllm_sparse.kernels import ops, triton_common
    from vllm_sparse.kernels.layout import PagedKVCache

    cache = PagedKVCache.allocate(2, 16, 2, 64, 16, torch.float32)
    monkeypatch.setattr(triton_common, "INTERPRET", False)
    with pytest.raises(ValueError, match="imported before TRITON_INTERPRET=1"):
        ops.write_kv(torch.randn(1, 2, 64), torch.randn(1, 2, 64), torch.tensor([5]), cache, force_triton=True)


def test_an_engine_with_the_switch_but_no_interpreter_stops_with_the_named_error(tiny_llama_dir, monkeypatch):
    _skip_unless_cpu_build()
    monkeypatch.setenv(SWITCH, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=f"{SWITCH}=1"):
        with make_llm(tiny_llama_dir, sparse={}, dtype="float32", max_model_len=256):
            pass


def test_the_cuda_platform_would_choose_page_size_as_the_block_size(tiny_llama_dir):
    """The CUDA platform picks the block size by the base platform's rule (the CPU platform overrides it,
    ``vllm_sparse.platform`` sets it): here that rule, on a real engine config, gives ``page_size``."""
    from vllm.config.cache import CacheConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms.interface import Platform

    from vllm_sparse.backend import SparseAttentionBackend

    for page_size in (16, 32, 64):
        args = EngineArgs(model=str(tiny_llama_dir), attention_backend="CUSTOM", max_model_len=256,
                          additional_config={"vllm_sparse": {"page_size": page_size}})
        cfg = args.create_engine_config()
        rule = Platform._preferred_block_size_for_backends  # what update_block_size_for_backend asks
        assert rule([SparseAttentionBackend], CacheConfig.DEFAULT_BLOCK_SIZE, cfg) == page_size


# ---------------------------------------------------------------------------------------------- in vLLM
def _route_ran(spy, compacted=True):
    """Every attention call took the CUDA route on CPU tensors, over the plugin's row layout, through the
    Triton kernels: K/V writes, prefills and (whole-page selections: compacted-table) sparse decodes."""
    batches = spy.calls["SparseAttentionImpl._forward_cuda"]
    assert batches and spy.count("SparseAttentionImpl._forward_cpu") == spy.count("cpu_attention.write_kv") == 0
    assert all(b["cpu"] and b["layout_rows"] for b in batches)
    assert spy.count("triton_kv_write.write_kv_triton") == spy.count("ops.write_kv") > 0
    assert spy.count("triton_paged_attn.paged_attention_triton") == spy.count("ops.paged_attention") > 0
    decodes = spy.count("ops.sparse_decode")
    assert decodes > 0
    if compacted:
        assert spy.count("triton_select.select_tables_triton") == decodes
        assert spy.count("triton_sparse_attn.table_decode_triton") == decodes
    return batches


@pytest.mark.slow
def test_full_budget_cuda_route_gives_stock_tokens_with_chunked_prefill_and_preemption(tiny_llama_dir,
                                                                                       emulate_cuda, route_spy):
    """Budget = context through the sparse path (``force_sparse``; the first layer dense, ``dense_layers``):
    stock's greedy tokens in float32, with prompts prefilled in 64-token chunks beside running decodes, and
    a KV pool of 8 blocks of 32 tokens (one of them vLLM's null block): the three requests fit at
    admission (3 + 3 + 1 blocks) but not once the two long ones pass 96 tokens, so vLLM preempts one and
    recomputes it."""
    prompts = [{"prompt_token_ids": essay_ids(tiny_llama_dir, n, start=i * 1000)} for i, n in enumerate((90, 90, 9))]
    engine = dict(dtype="float32", max_model_len=192, enable_chunked_prefill=True, max_num_batched_tokens=64)
    full = {"alpha": 1.0, "k": 1.0, "dense_below": 0, "force_sparse": True, "dense_layers": 1}
    stock = generate_once(tiny_llama_dir, prompts, backend="stock", max_tokens=12, **engine)
    assert route_spy.count("SparseAttentionImpl._forward_cuda") == 0  # the stock backend is not ours
    outs, preempted = generate_once(tiny_llama_dir, prompts, sparse=full, max_tokens=12, with_llm=preemptions,
                                    num_gpu_blocks_override=8, disable_log_stats=False, **engine)
    batches = _route_ran(route_spy)
    assert preempted > 0
    assert any(b["decodes"] and b["prefill_tokens"] for b in batches)  # decodes beside a prefill chunk
    assert any(b["later_chunk"] for b in batches)  # a chunk attending the cached chunks before it
    assert not any(b["dense"] for b in batches if b["decodes"])  # force_sparse: never the dense shortcut
    # layer 0 decodes densely, layer 1 sparsely: one call each per step with decodes
    assert route_spy.count("ops.dense_decode") == route_spy.count("ops.sparse_decode") > 0
    assert route_spy.count("triton_sparse_attn.dense_decode_triton") == route_spy.count("ops.dense_decode")
    assert [o.token_ids for o in outs] == [o.token_ids for o in stock]


def _positions_of_tables(tables, lens, block_table, seq_lens, page_size):
    """Compacted tables ``[B, S, W]`` (block ids) and ``lens`` ``[B, S]`` -> per row, the set of positions read."""
    rows = []
    for b in range(tables.shape[0]):
        n = int(seq_lens[b])
        page_of = {int(blk): p for p, blk in enumerate(block_table[b, : math.ceil(n / page_size)].tolist())}
        rows.append([])
        for s in range(tables.shape[1]):
            pages = [page_of[int(t)] for t in tables[b, s, : math.ceil(int(lens[b, s]) / page_size)]]
            rows[-1].append({p * page_size + i for p in pages for i in range(page_size) if p * page_size + i < n})
    return rows


def _positions_of_index(idx):
    return [[{int(p) for p in row if p >= 0} for row in req] for req in idx]


#: the CUDA route's decode output against the torch reference on the same inputs, by model dtype
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


@pytest.mark.slow
@pytest.mark.parametrize("selection, granularity, dtype", [("exact_pages", "kv_head", "bfloat16"),
                                                            ("token", "query_head", "float32")])
def test_small_budget_cuda_route_attends_the_reference_selection(tiny_llama_dir, emulate_cuda, route_spy,
                                                                 selection, granularity, dtype):
    """At a budget of a fraction of the context, every sparse decode call of the CUDA route (each layer,
    each step) attends exactly the positions the torch reference selects on the same inputs, and its
    output is the reference's: whole pages through compacted block tables (``exact_pages``, the default,
    one set per KV head) in bf16, a GPU's dtype; tokens through an index (``token``, one set per query
    head) in float32."""
    from vllm_sparse.kernels import ops, reference, triton_select

    chosen = []  # the route's selection in the call being checked
    if selection == "token":
        route_spy.wrap(ops, "select_topk", lambda idx, *a, **k: chosen.append(_positions_of_index(idx)), key="chosen")
    else:
        def tables(result, query, cache, block_table, seq_lens, *a, **k):
            chosen.append(_positions_of_tables(*result, block_table, seq_lens, cache.page_size))

        route_spy.wrap(triton_select, "select_tables_triton", tables, key="chosen")
    checks = []

    def check(out, query, cache, block_table, seq_lens, attended, scale, params, **kwargs):
        ref_pos = _positions_of_index(reference.select_topk(query, cache, block_table, seq_lens, attended, scale,
                                                            params))
        ref_out = reference.sparse_decode(query, cache, block_table, seq_lens, attended, scale, params)
        got = chosen.pop()
        sparse = all(len(pos) < int(n) for req, n in zip(ref_pos, seq_lens) for pos in req)
        checks.append(dict(same=got == ref_pos, sparse=sparse, rows=sum(len(req) for req in got),
                           err=float((out.float() - ref_out.float()).abs().max()), dtype=out.dtype,
                           lens=seq_lens.tolist()))

    route_spy.wrap(ops, "sparse_decode", check, key="checked")
    prompts = [{"prompt_token_ids": essay_ids(tiny_llama_dir, n, start=i * 1000)} for i, n in enumerate((200, 120))]
    settings = {"dense_below": 0, "k": 1.0, "alpha": 0.5, "min_budget": 64, "sink_tokens": 4, "local_window": 16,
                "page_size": 16, "selection": selection, "granularity": granularity}
    outs = generate_once(tiny_llama_dir, prompts, sparse=settings, max_tokens=4, dtype=dtype, max_model_len=512)
    assert all(len(o.token_ids) == 4 for o in outs)
    _route_ran(route_spy, compacted=selection == "exact_pages")
    assert len(checks) >= 2 * 3  # two layers, three decode steps at least
    assert all(c["dtype"] == getattr(torch, dtype) for c in checks)
    assert all(c["rows"] == 2 * (6 if granularity == "query_head" else 2) for c in checks)  # requests × rows
    assert all(c["sparse"] for c in checks), checks  # a fraction of every context: the selection matters
    assert all(c["same"] for c in checks), [c for c in checks if not c["same"]]
    assert max(c["err"] for c in checks) < TOLERANCE[dtype], checks


def _softmax_options(_, *args, window=-1, softcap=0.0, sinks=None, **kwargs):
    return window, softcap, sinks is not None


def _tokens_and_logprobs(outputs):
    return [[(t, d[t].logprob) for t, d in zip(o.token_ids, o.logprobs)] for o in outputs]


@pytest.mark.parametrize("arch, softcap", [("gemma2", 2.0), ("gemma3", 0.0)])
def test_windowed_and_soft_capped_models_on_the_cuda_route(request, emulate_cuda, route_spy, arch, softcap):
    """Gemma 2 (every other layer a 64-token window, logits capped at 2.0) and Gemma 3 (4 windowed
    layers of 6) on the CUDA route: at full budget (``force_sparse``) stock's greedy tokens and
    log-probabilities (float32), a prompt twice the window long, with the windowed layers attending
    exactly their window (prefill and dense decode) and the full layers decoding sparsely over
    compacted tables, every call with the layer's cap; at a small budget the full layers' decode
    really is sparse (a fraction of the context, counted once per step)."""
    from vllm.inputs import TokensPrompt

    from vllm_sparse import stats
    from vllm_sparse.kernels import ops

    model = request.getfixturevalue(f"tiny_{arch}_dir")
    for name in ("paged_attention", "dense_decode", "sparse_decode"):
        route_spy.wrap(ops, name, _softmax_options, key=f"options.{name}")
    prompts = [TokensPrompt(prompt_token_ids=essay_ids(model, n, start=i * 1000)) for i, n in enumerate((5, 130))]
    engine = dict(dtype="float32", max_model_len=256)
    stock = _tokens_and_logprobs(generate_once(model, prompts, backend="stock", max_tokens=4, logprobs=0, **engine))
    full = {"alpha": 1.0, "k": 1.0, "dense_below": 0, "force_sparse": True}
    got = _tokens_and_logprobs(generate_once(model, prompts, sparse=full, max_tokens=4, logprobs=0, **engine))
    assert [[t for t, _ in o] for o in got] == [[t for t, _ in o] for o in stock]
    for ours, theirs in zip(got, stock):
        assert [lp for _, lp in ours] == pytest.approx([lp for _, lp in theirs], abs=1e-4)
    _route_ran(route_spy)
    calls = route_spy.calls
    assert set(calls["options.paged_attention"]) == {(-1, softcap, False), (64, softcap, False)}
    assert set(calls["options.dense_decode"]) == {(64, softcap, False)}  # only the windowed layers decode densely
    assert set(calls["options.sparse_decode"]) == {(-1, softcap, False)}

    small = {"dense_below": 0, "min_budget": 32, "k": 1.0, "alpha": 0.5, "page_size": 16, "sink_tokens": 4,
             "local_window": 16}
    before = stats.snapshot()
    outs = generate_once(model, prompts, sparse=small, max_tokens=4, **engine)
    after = stats.snapshot()
    assert all(len(o.token_ids) == 4 for o in outs)
    attended = after["attended_tokens"] - before["attended_tokens"]
    assert 0 < attended < 0.75 * (after["context_tokens"] - before["context_tokens"])
