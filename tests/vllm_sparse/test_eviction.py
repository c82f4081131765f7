"""Eviction inside stock vLLM: the block manager with vLLM's BlockPool, the workers' compacted
tables, and real runs where a prompt longer than the KV pool completes.

The real runs use tiny-llama (2 layers, SmolLM2's tokenizer and head layout, random weights): what
they check — blocks freed and reused, pool peaks, NaN-poisoned freed blocks never read, outputs
equal between runs — does not depend on trained weights, and it runs ~10x faster than SmolLM2 on
a 2-core CPU. What eviction costs in answers is measured on SmolLM2 by ``benchmarks/quality.py``."""

import gc
import math

import pytest
import torch

from vllm_sparse.policies.eviction import EvictionRule

E = pytest.importorskip("vllm_sparse.eviction")

from llm_utils import essay_ids, generate_once, greedy, make_llm, preemptions  # noqa: E402

RULE = EvictionRule(block_size=16, sink_tokens=4, k=8.0, alpha=0.5, min_keep=64)


def _spec(rule=RULE):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    base = FullAttentionSpec(block_size=rule.block_size, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    return E.evicting_spec(base, rule, max_in_flight_tokens=256, max_model_len=4096)


def test_spec_is_bounded_and_not_prefix_cacheable():
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = _spec()
    assert isinstance(spec, FullAttentionSpec) and not spec.prefix_cacheable
    # sinks + kept tail at 4096 (ceil(8·64) = 512 - 4 tokens) + one chunk in flight + a partial block
    assert spec.evict_max_blocks == 1 + math.ceil((512 - 4 + 256) / 16) + 1
    assert spec.max_admission_blocks_per_request(256, 4096) == spec.evict_max_blocks
    merged = type(spec).merge([spec, spec])
    assert merged == spec and type(merged) is type(spec)
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    assert KVCacheSpecRegistry.get_manager_class(spec) is E.EvictingManager


def test_manager_frees_exactly_the_rule_over_2000_steps():
    """vLLM's BlockPool + the manager, driven like the scheduler: a 700-token prompt in 128-token
    chunks, then 2,000 decode steps. After every step the request holds its sink block and the
    blocks from free_end(p) on, and every other block it had is back in the pool."""
    from vllm.v1.core.block_pool import BlockPool

    spec = _spec()
    pool = BlockPool(num_gpu_blocks=200, enable_caching=False, hash_block_size=16)
    mgr = E.EvictingManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0,
                            scheduler_block_size=16)
    assert mgr.max_admission_blocks_per_request == spec.evict_max_blocks
    rid, bs = "r", 16
    processed, ever, allocated = 0, set(), 0
    steps = [128] * 5 + [60] + [1] * 2000  # chunked prefill, then decode
    for n_new in steps:
        mgr.remove_skipped_blocks(rid, processed)  # the scheduler frees on the processed count first
        total = processed + n_new
        need = mgr.get_num_blocks_to_allocate(rid, total, [], 0, processed, processed, total)
        assert need <= pool.get_num_free_blocks()
        new = mgr.allocate_new_blocks(rid, total, total)
        ever |= {b.block_id for b in new}
        allocated += len(new)
        processed = total  # the forward pass finished
        blocks = mgr.req_to_blocks[rid]
        end = RULE.free_end(processed - n_new)  # what was freed before this step's allocation
        live = [i for i, b in enumerate(blocks) if not b.is_null]
        assert live == list(range(RULE.sink_blocks)) + list(range(end, math.ceil(total / bs)))
        held = {blocks[i].block_id for i in live}
        assert pool.get_num_free_blocks() == 200 - 1 - len(held)  # minus the null block
        assert len(live) <= spec.evict_max_blocks
    # 2,700 tokens took 169 blocks in all, from far fewer distinct ones: freed blocks were reused
    assert allocated == math.ceil(2700 / bs) and len(ever) < allocated // 2


def test_compacted_table_by_hand():
    rule = EvictionRule(block_size=4, sink_tokens=2, k=8.0, alpha=0.0, min_keep=8, max_keep=8)
    bt = torch.arange(100, 110).repeat(2, 1).int()
    seq = torch.tensor([30, 6])
    qlen = torch.tensor([1, 6])
    table, lens = E.compact_block_table(rule, bt, seq, qlen)
    # request 0: p = 29, keeps 8 → tail from position 29 - 6 = 23 → block 5; sink block 0
    assert rule.free_end(29) == 5
    assert table[0, :4].tolist() == [100, 105, 106, 107] and lens[0] == 30 - 4 * 4
    # request 1: nothing processed yet, nothing skipped
    assert table[1, :2].tolist() == [100, 101] and lens[1] == 6


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("evict", ["streaming", "knorm", "h2o", "tova", "snapkv"])
def test_prompt_longer_than_the_pool_completes(tiny_llama_dir, evict):
    """4,000 tokens, chunked prefill (512), in a pool of 80 blocks × 32 = 2,560 tokens: evicting
    frees the middle as it goes. Dense attention with the same pool refuses to start."""
    prompt = {"prompt_token_ids": essay_ids(tiny_llama_dir, 4000)}
    common = dict(max_num_batched_tokens=512, num_gpu_blocks_override=80, enable_prefix_caching=False)
    peak = {}

    def run(llm):
        pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
        free_blocks = pool.get_num_free_blocks
        low = [free_blocks()]
        orig = pool.get_new_blocks

        def tracked(n, *a, **k):
            out = orig(n, *a, **k)
            low.append(free_blocks())
            return out

        pool.get_new_blocks = tracked
        outs = greedy(llm, [prompt], max_tokens=16)
        peak["blocks"] = 80 - 1 - min(low)
        return outs

    with make_llm(tiny_llama_dir, sparse={"evict": evict}, **common) as llm:
        outs = run(llm)
        del llm
    gc.collect()
    assert len(outs[0].token_ids) == 16 and outs[0].text.strip()
    assert peak["blocks"] < 60  # ~2/3 of the pool at most; 4,000 tokens would need 125 blocks
    with pytest.raises(ValueError, match="max seq len"):
        with make_llm(tiny_llama_dir, sparse={}, **common):
            pass


@pytest.mark.vllm
def test_eviction_is_refused_with_prefix_caching(tiny_llama_dir):
    with pytest.raises(ValueError, match="evict.*prefix caching"):
        with make_llm(tiny_llama_dir, sparse={"evict": "streaming"}, enable_prefix_caching=True):
            pass


@pytest.mark.vllm
@pytest.mark.slow
def test_kept_budget_covering_the_context_equals_no_eviction(tiny_llama_dir):
    """Eviction keeping more than the context frees nothing: greedy outputs equal the non-evicting run."""
    prompts = [{"prompt_token_ids": essay_ids(tiny_llama_dir, n, start=i * 3000)} for i, n in enumerate((300, 1200, 2500))]
    common = dict(dtype="float32", max_num_batched_tokens=512, enable_prefix_caching=False, max_model_len=4096)
    plain = generate_once(tiny_llama_dir, prompts, sparse={}, max_tokens=24, **common)
    kept = generate_once(tiny_llama_dir, prompts, sparse={"evict": "streaming", "evict_args": {"keep": 4096}},
                         max_tokens=24, **common)
    assert [o.token_ids for o in kept] == [o.token_ids for o in plain]


def test_attention_over_compacted_tables_equals_masked_dense_float32():
    """vLLM's CPU op over the compacted tables (a decode and a prefill chunk) equals float64
    attention over exactly the kept positions — sink block + live tail, causal — and never reads
    a skipped block (those are NaN-poisoned)."""
    C = pytest.importorskip("vllm_sparse.cpu_attention")
    from test_cpu_attention import make_cache

    rule = EvictionRule(block_size=16, sink_tokens=4, k=128.0, alpha=0.0, min_keep=128, max_keep=128)
    lens, qlens, hkv, g, d = [900, 300], [1, 40], 2, 3, 64
    cache, bt, keys, values = make_cache(lens, hkv, d, 16, torch.float32)
    seq, ql = torch.tensor(lens), torch.tensor(qlens)
    table, clen = E.compact_block_table(rule, bt, seq, ql)
    bs = 16
    for b, n in enumerate(lens):  # poison every block the rule skips
        end = rule.free_end(n - qlens[b])
        for j in range(rule.sink_blocks, end):
            cache.key_cache[int(bt[b, j])].fill_(float("nan"))
            cache.value_cache[int(bt[b, j])].fill_(float("nan"))
    qsl = torch.tensor([0, 1, 41], dtype=torch.int32)
    q = torch.randn(41, hkv * g, d)
    md = C.scheduler_metadata(clen, qsl, hkv * g, hkv, d, torch.float32, C.cpu_isa(bs))
    out = torch.empty_like(q)
    C.attention(q, cache, table, clen, qsl, md, d ** -0.5, out)
    assert torch.isfinite(out).all()
    for b, n in enumerate(lens):
        end = rule.free_end(n - qlens[b])
        kept = torch.cat([torch.arange(rule.sink_blocks * bs), torch.arange(end * bs, n)])
        assert end > rule.sink_blocks and len(kept) == int(clen[b])
        for i in range(qlens[b]):
            pos = n - qlens[b] + i
            vis = kept[kept <= pos]
            k, v = keys[b][vis].double(), values[b][vis].double()  # [T, H, D]
            for h in range(hkv):
                qq = q[int(qsl[b]) + i, h * g:(h + 1) * g].double()
                ref = torch.softmax(qq @ k[:, h].T * d ** -0.5, -1) @ v[:, h]
                got = out[int(qsl[b]) + i, h * g:(h + 1) * g].double()
                assert ((got - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("evict", ["streaming", "h2o"])  # knorm/tova share h2o's merge path
def test_freed_blocks_poisoned_with_nan_are_never_read(tiny_llama_dir, evict):
    """Every block the manager frees is filled with NaN in every layer's cache the moment it is
    freed (and cleaned when vLLM hands it out again): outputs stay finite and equal an unpoisoned run."""
    prompts = [{"prompt_token_ids": essay_ids(tiny_llama_dir, n, start=i * 7000)} for i, n in enumerate((3000, 1500))]
    common = dict(dtype="float32", max_num_batched_tokens=512, enable_prefix_caching=False, max_model_len=4096,
                  num_gpu_blocks_override=120)
    sparse = {"evict": evict, "evict_args": {"keep": 512}} if evict != "streaming" else {"evict": evict}
    clean = generate_once(tiny_llama_dir, prompts, sparse=sparse, max_tokens=24, **common)
    poisoned = {"n": 0}

    def run(llm):
        core = llm.llm_engine.engine_core.engine_core
        caches = core.model_executor.driver_worker.worker.model_runner.kv_caches
        pool = core.scheduler.kv_cache_manager.block_pool
        (mgr,) = core.scheduler.kv_cache_manager.coordinator.single_type_managers
        assert isinstance(mgr, E.EvictingManager)
        free_blocks, get_new = pool.free_blocks, pool.get_new_blocks

        def poison_on_free(blocks, *a, **k):
            blocks = list(blocks)
            for blk in blocks:
                if blk.is_null:
                    continue
                for kv in caches:
                    kv[blk.block_id].fill_(float("nan"))
                poisoned["n"] += 1
            return free_blocks(blocks, *a, **k)

        def clean_on_alloc(n, *a, **k):
            out = get_new(n, *a, **k)
            for blk in out:
                for kv in caches:
                    kv[blk.block_id].zero_()
            return out

        pool.free_blocks, pool.get_new_blocks = poison_on_free, clean_on_alloc
        return greedy(llm, prompts, max_tokens=24)

    with make_llm(tiny_llama_dir, sparse=sparse, **common) as llm:
        outs = run(llm)
        del llm
    gc.collect()
    assert poisoned["n"] > 50  # the 3,000-token prompt alone frees ~80 blocks
    assert [o.token_ids for o in outs] == [o.token_ids for o in clean]
    assert all(o.text.strip() for o in outs)


@pytest.mark.vllm
@pytest.mark.slow
def test_four_long_requests_share_a_pool_that_holds_one_dense(tiny_llama_dir):
    """Four concurrent 3,000-token requests in a 160-block pool (5,120 tokens): dense attention
    holds one request at a time (vLLM admits a prompt only when all of it fits); with eviction
    three run together (no more preemptions than dense, vLLM's own counter)."""
    prompts = [{"prompt_token_ids": essay_ids(tiny_llama_dir, 3000, start=i * 3000)} for i in range(4)]
    common = dict(max_num_batched_tokens=512, enable_prefix_caching=False, max_model_len=4096,
                  num_gpu_blocks_override=160, disable_log_stats=False)
    result = {}
    for name, sparse in {"dense": {}, "evict": {"evict": "streaming"}}.items():
        with make_llm(tiny_llama_dir, sparse=sparse, **common) as llm:
            sched = llm.llm_engine.engine_core.engine_core.scheduler
            peak = [0]
            schedule = sched.schedule

            def tracked(*a, **k):
                out = schedule(*a, **k)
                peak[0] = max(peak[0], len(sched.running))
                return out

            sched.schedule = tracked
            outs = greedy(llm, prompts, max_tokens=8)
            preempted = preemptions(llm)
            result[name] = dict(peak=peak[0], preemptions=preempted)
            assert all(len(o.token_ids) == 8 for o in outs)
            del llm, sched, schedule, tracked  # no engine may outlive its block (the next one reuses the groups)
        gc.collect()
    print(result)
    assert result["dense"]["peak"] == 1
    # each evicting request reserves sinks + kept tail + two steps of 512 tokens in flight (~47 blocks)
    assert result["evict"]["peak"] >= 3
    assert result["evict"]["preemptions"] <= result["dense"]["preemptions"]


def test_merge_keeps_each_heads_lowest_norm_tokens_in_the_region():
    """knorm eviction: after a merge, each KV head's region slots hold exactly the region_blocks ×
    block_size tokens of smallest key norm among (region ∪ leaving blocks), K and V together, and
    the region's page summaries match its new keys."""
    C = pytest.importorskip("vllm_sparse.cpu_attention")
    from test_cpu_attention import make_cache

    from vllm_sparse.policies import get_policy_class

    bs, hkv, d = 16, 3, 64
    rule = EvictionRule(block_size=bs, sink_tokens=4, k=36.0, alpha=0.0, min_keep=36, max_keep=36, region_blocks=2)
    n = 200
    cache, bt, keys, values = make_cache([n], hkv, d, bs, torch.float32)
    seq, ql = torch.tensor([n]), torch.tensor([1])
    lo, hi = rule.free_end(n - 1), rule.free_end(n)
    while hi == lo:  # step until a block leaves the window
        n -= 1
        seq, lo, hi = torch.tensor([n]), rule.free_end(n - 1), rule.free_end(n)
    plan = E.plan_merges(rule, bt, seq, ql)
    assert plan.rows == [(0, lo, hi)]
    E.merge_into_region(cache, plan, rule, get_policy_class("knorm")(), C.write_kv)
    s = rule.sink_blocks
    cand = torch.cat([torch.arange(s * bs, (s + 2) * bs), torch.arange(lo * bs, hi * bs)])
    region = bt[0, s:s + 2].long()
    got_k = cache.key_cache[region].reshape(-1, hkv, d)
    got_v = cache.value_cache[region].reshape(-1, hkv, d)
    for h in range(hkv):
        norms = keys[0][cand, h].norm(dim=-1)
        want = cand[norms.argsort()[: 2 * bs]].sort().values
        assert torch.equal(got_k[:, h], keys[0][want, h])
        assert torch.equal(got_v[:, h], values[0][want, h])
    kmin, kmax = cache.gather_page_bounds(bt[:, s:s + 2].long(), 2, torch.arange(hkv))
    ref = got_k.view(2, bs, hkv, d)
    assert torch.equal(kmin[0], ref.amin(1).permute(1, 0, 2)) and torch.equal(kmax[0], ref.amax(1).permute(1, 0, 2))


def test_h2o_state_accumulates_exact_attention_and_moves_with_its_tokens():
    """h2o eviction: the per-token float32 scores in the blocks' extra rows equal the attention the
    step's queries paid (float64 reference, causal over a prefill chunk, summed over the group);
    rewritten slots start at zero; a merge keeps each head's highest scores and moves them along."""
    C = pytest.importorskip("vllm_sparse.cpu_attention")
    from vllm_sparse.kernels import PagedKVCache
    from vllm_sparse.kernels.layout import score_states
    from vllm_sparse.policies import get_policy_class

    # one float32 per token: one extra 2·head_size row per head slot for 32-token bf16 blocks (capacity 32/34)
    assert score_states(32, 64, torch.bfloat16) == 1 and score_states(32, 64, torch.float32) == 1
    assert score_states(128, 64, torch.bfloat16) == 2
    bs, hkv, g, d, n, m = 16, 2, 3, 64, 150, 20
    rows = score_states(bs, d, torch.float32)
    nb = 12
    raw = torch.zeros(nb, hkv, bs + 1 + rows, 2 * d)
    cache = PagedKVCache.from_raw(raw, hkv, bs, key_transposed=True, score_rows=rows)
    table = torch.randperm(nb)[: -(-n // bs)].int()[None]
    pos = torch.arange(n)
    slots = table[0, pos // bs].long() * bs + pos % bs
    k, v = torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    C.write_kv(k, v, slots, cache)
    E.reset_scores(cache, slots)
    assert cache.token_scores[table[0].long()].abs().sum() == 0
    q = torch.randn(m, hkv * g, d)  # a prefill chunk: the last m positions
    qsl = torch.tensor([0, m])
    h2o = get_policy_class("h2o")()
    E.update_token_state(q, cache, table, torch.tensor([n]), qsl, 0.125, h2o)
    E.update_token_state(q[-1:], cache, table, torch.tensor([n]), torch.tensor([0, 1]), 0.125, h2o)  # a decode step
    want = torch.zeros(hkv, n, dtype=torch.float64)
    for h in range(hkv):
        for i in range(m):
            p = n - m + i
            for j in range(g):
                w = torch.softmax(q[i, h * g + j].double() @ k[: p + 1, h].double().T * 0.125, -1)
                want[h, : p + 1] += w
        for j in range(g):
            want[h] += torch.softmax(q[-1, h * g + j].double() @ k[:, h].double().T * 0.125, -1)
    got = cache.token_scores[table[0, pos // bs].long(), :, pos % bs].T
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6)
    # a merge: region = blocks 1-2 (sink block 0), leaving = blocks 3-4; keep the top 32 scores per head
    rule = EvictionRule(block_size=bs, sink_tokens=4, k=36.0, alpha=0.0, min_keep=36, max_keep=36, region_blocks=2)
    plan = E.MergePlan(rows=[(0, 3, 5)], block_table=table)
    before = got.clone()
    E.merge_into_region(cache, plan, rule, h2o, C.write_kv)
    region = table[0, 1:3].long()
    for h in range(hkv):
        cand = torch.arange(bs, 5 * bs)
        best = cand[before[h, cand].argsort(descending=True)[: 2 * bs]].sort().values
        assert torch.equal(cache.key_cache[region].reshape(-1, hkv, d)[:, h], k[best, h])
        assert torch.equal(cache.value_cache[region].reshape(-1, hkv, d)[:, h], v[best, h])
        assert torch.equal(cache.token_scores[region][:, h].flatten(), before[h, best])


@pytest.mark.parametrize("name", ["h2o", "tova", "snapkv"])
def test_batched_decode_state_equals_the_per_request_reference(name):
    """A decode step of several requests (different lengths, shuffled blocks, a prefill chunk mixed
    in) updates each token's state exactly as one request at a time does (the decodes go through
    the policy's update_state together, padded to the longest)."""
    C = pytest.importorskip("vllm_sparse.cpu_attention")
    from vllm_sparse.kernels import PagedKVCache
    from vllm_sparse.kernels.layout import score_states
    from vllm_sparse.policies import get_policy_class

    policy = get_policy_class(name)(window=4, kernel=3) if name == "snapkv" else get_policy_class(name)()

    bs, hkv, g, d = 16, 3, 3, 64
    lens, qlens = [37, 150, 50, 96], [1, 1, 9, 1]  # request 2 is a prefill chunk (its last 9 tokens)
    rows = score_states(bs, d, torch.bfloat16)
    nb = sum(-(-n // bs) for n in lens) + 4
    caches = [PagedKVCache.from_raw(torch.zeros(nb, hkv, bs + 1 + rows, 2 * d, dtype=torch.bfloat16), hkv, bs,
                                    key_transposed=True, score_rows=rows) for _ in range(2)]
    perm = torch.randperm(nb)
    table = torch.full((len(lens), 12), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        table[b, : -(-n // bs)] = perm[used: used + -(-n // bs)]
        used += -(-n // bs)
        pos = torch.arange(n)
        slots = table[b, pos // bs].long() * bs + pos % bs
        k = torch.randn(n, hkv, d).bfloat16()
        before = torch.rand(-(-n // bs), hkv, bs)  # earlier steps' state (summed or replaced)
        for cache in caches:
            C.write_kv(k, k, slots, cache)
            cache.token_scores[table[b, : -(-n // bs)].long()] = before
    q = torch.randn(sum(qlens), hkv * g, d).bfloat16()
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()])
    E.update_token_state(q, caches[0], table, torch.tensor(lens), qsl, 0.125, policy)  # batched decodes
    for b, n in enumerate(lens):  # the reference, one request at a time
        one = torch.tensor([0, qlens[b]])
        E.update_token_state(q[qsl[b]: qsl[b + 1]], caches[1], table[b:b + 1], torch.tensor([n]), one, 0.125, policy)
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        got, want = (c.token_scores[table[b, pos // bs].long(), :, pos % bs] for c in caches)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), b


def test_tova_state_is_the_latest_querys_group_averaged_attention():
    C = pytest.importorskip("vllm_sparse.cpu_attention")
    from vllm_sparse.kernels import PagedKVCache
    from vllm_sparse.kernels.layout import score_states
    from vllm_sparse.policies import get_policy_class

    bs, hkv, g, d, n = 16, 2, 3, 64, 90
    rows = score_states(bs, d, torch.bfloat16)
    cache = PagedKVCache.from_raw(torch.zeros(8, hkv, bs + 1 + rows, 2 * d, dtype=torch.bfloat16), hkv, bs,
                                  key_transposed=True, score_rows=rows)
    table = torch.randperm(8)[:6].int()[None]
    pos = torch.arange(n)
    slots = table[0, pos // bs].long() * bs + pos % bs
    k = torch.randn(n, hkv, d).bfloat16()
    C.write_kv(k, k, slots, cache)
    E.reset_scores(cache, slots)
    tova = get_policy_class("tova")()
    for _ in range(2):  # replaced, not summed
        q = torch.randn(5, hkv * g, d).bfloat16()
        E.update_token_state(q, cache, table, torch.tensor([n]), torch.tensor([0, 5]), 0.125, tova)
    got = cache.token_scores[table[0, pos // bs].long(), :, pos % bs].T.double()
    for h in range(hkv):
        want = torch.stack([torch.softmax(q[-1, h * g + j].double() @ k[:, h].double().T * 0.125, -1)
                            for j in range(g)]).mean(0)
        assert torch.allclose(got[h], want, rtol=1e-4, atol=1e-6)


def test_snapkv_state_is_the_chunks_pooled_window_votes_and_decode_leaves_it():
    """snapkv eviction: after a prefill chunk each resident token's state is the pooled vote of the
    chunk's last ``window`` queries (float64 reference, causal, summed over window and group,
    average-pooled with ``kernel``; the window itself +inf); decode steps leave it; a newly written
    token starts at +inf (generated tokens are kept)."""
    C = pytest.importorskip("vllm_sparse.cpu_attention")
    from vllm_sparse.kernels import PagedKVCache
    from vllm_sparse.kernels.layout import score_states
    from vllm_sparse.policies import get_policy_class

    policy = get_policy_class("snapkv")(window=8, kernel=3)
    bs, hkv, g, d, n, m = 16, 2, 3, 64, 120, 20
    rows = score_states(bs, d, torch.float32)
    cache = PagedKVCache.from_raw(torch.zeros(10, hkv, bs + 1 + rows, 2 * d), hkv, bs, key_transposed=True,
                                  score_rows=rows)
    table = torch.randperm(10)[: -(-n // bs)].int()[None]
    pos = torch.arange(n)
    slots = table[0, pos // bs].long() * bs + pos % bs
    k = torch.randn(n, hkv, d)
    C.write_kv(k, torch.randn(n, hkv, d), slots, cache)
    E.reset_scores(cache, slots, policy.new_token_state)
    assert torch.isinf(cache.token_scores[table[0, pos // bs].long(), :, pos % bs]).all()
    q = torch.randn(m, hkv * g, d)  # a prefill chunk: the last m positions
    E.update_token_state(q, cache, table, torch.tensor([n]), torch.tensor([0, m]), 0.125, policy)
    got = cache.token_scores[table[0, pos // bs].long(), :, pos % bs].T.double()
    w, half = policy.window, policy.kernel // 2
    for h in range(hkv):
        votes = torch.zeros(n, dtype=torch.float64)
        for i in range(m - w, m):
            p = n - m + i
            for j in range(g):
                votes[: p + 1] += torch.softmax(q[i, h * g + j].double() @ k[: p + 1, h].double().T * 0.125, -1)
        want = torch.stack([votes[max(0, t - half): t + half + 1].mean() for t in range(n)])
        assert torch.allclose(got[h, : n - w], want[: n - w], rtol=1e-4, atol=1e-7)
        assert torch.isinf(got[h, n - w:]).all()
    # a decode step does not vote: the state stays
    E.update_token_state(torch.randn(1, hkv * g, d), cache, table, torch.tensor([n]), torch.tensor([0, 1]), 0.125,
                         policy)
    assert torch.equal(cache.token_scores[table[0, pos // bs].long(), :, pos % bs].T.double(), got)


@pytest.mark.vllm
@pytest.mark.slow
def test_third_party_eviction_policy_frees_blocks_in_vllm(tiny_llama_dir, example_package, monkeypatch):
    """examples/third_party_policy, pip-installed: `evict: "scissorhands"`, a policy from a
    third-party file, runs inside vLLM — the workers call its update_state every step and its score
    at every merge — and frees the middle of a 4,000-token prompt in an 80-block pool, as the
    built-in policies do (test_prompt_longer_than_the_pool_completes)."""
    from vllm_sparse.policies import get_policy_class, registry

    registry.reload_entry_points()
    cls = get_policy_class("scissorhands")
    assert cls.__module__ == "vllm_sparse_keydiff.scissorhands"
    calls = {"update_state": 0, "score": 0}

    def counted(name):
        method = getattr(cls, name)

        def run(self, *args):
            calls[name] += 1
            return method(self, *args)

        return run

    for name in calls:
        monkeypatch.setattr(cls, name, counted(name))
    prompt = {"prompt_token_ids": essay_ids(tiny_llama_dir, 4000)}
    common = dict(max_num_batched_tokens=512, num_gpu_blocks_override=80, enable_prefix_caching=False)
    with make_llm(tiny_llama_dir, sparse={"evict": "scissorhands", "evict_args": {"keep": 1024}}, **common) as llm:
        pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
        low, get_new = [pool.get_num_free_blocks()], pool.get_new_blocks

        def tracked(n, *a, **k):
            out = get_new(n, *a, **k)
            low.append(pool.get_num_free_blocks())
            return out

        pool.get_new_blocks = tracked
        outs = greedy(llm, [prompt], max_tokens=16)
        del llm, pool
    gc.collect()
    assert len(outs[0].token_ids) == 16 and outs[0].text.strip()
    assert 80 - 1 - min(low) < 60  # 4,000 tokens would need 125 blocks: the middle was freed as it went
    # its state was updated in 2 layers × (8 prefill chunks + 15 decode steps); its score ranked the
    # tokens of the blocks leaving the window (one call per layer and step in which blocks left)
    assert calls["update_state"] >= 2 * (8 + 15) and calls["score"] >= 2
