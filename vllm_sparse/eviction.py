"""Eviction inside stock vLLM: an evicting KV-cache spec, its block manager, and the workers' view of it.

With ``{"vllm_sparse": {"evict": "streaming"}}`` a request keeps only its sink blocks and a live
tail of recent blocks (:class:`vllm_sparse.policies.eviction.EvictionRule`); the blocks in
between go back to vLLM's pool while the request runs, so a prompt longer than the pool fits.
With a scored policy (``knorm``, ``h2o``, ``tova``, ``snapkv``) a fixed *kept region* of blocks
after the sinks is never freed either: before a block leaves the tail, :func:`merge_into_region`
keeps the best-scored tokens of (region ∪ that block) in the region, per KV head. A policy's
per-token state (H2O's accumulated attention, TOVA's latest attention, SnapKV's votes: any policy
with ``keeps_token_state``) lives in extra rows of the blocks; every step the policy's own
``update_state`` changes it (:func:`update_token_state`).

* **Spec** — the backend's ``customize_spec`` returns :class:`EvictingAttentionSpec`, a
  ``FullAttentionSpec`` carrying the rule; not prefix-cacheable, and its
  ``max_memory_usage_bytes`` is the bounded footprint, so vLLM's start-up check and admission
  accept a ``max_model_len`` longer than the pool.
* **Manager** — :class:`EvictingManager` (registered for the spec in ``KVCacheSpecRegistry``)
  frees ``[sink_blocks, free_end(p))`` of each request in ``remove_skipped_blocks``, where ``p``
  is the request's processed-token count — the scheduler calls it before every allocation.
  Freed entries become the null block; nothing shifts.
* **Workers** — the metadata builder rewrites every request's block table to
  ``[sink blocks | live tail]`` and shortens its length to match (:func:`compact_block_table`),
  with the tail start computed from the same rule at the tokens processed *before* this step,
  which is never less than what the scheduler has freed. Keys are stored after RoPE, so
  attention over the compacted sequence is attention over sinks + recent tokens at their true
  positions; no freed block is ever read (stale ids stay in the worker's table, unread).

Refused at start-up with a message: prefix caching (rewritten tables break block hashes),
speculative decoding (drafts move ``p``), KV connectors (they read blocks by position).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_sparse.policies.eviction import EvictionRule

__all__ = ["EvictingAttentionSpec", "EvictingManager", "register", "compact_block_table", "check_engine_config",
           "plan_merges", "merge_into_region", "reset_scores", "update_token_state"]


@dataclass(frozen=True, kw_only=True)
class EvictingAttentionSpec(FullAttentionSpec):
    """``FullAttentionSpec`` whose requests free their middle blocks by :class:`EvictionRule`."""

    evict_sink_tokens: int
    evict_k: float
    evict_alpha: float
    evict_min_keep: int
    evict_max_keep: int | None = None
    evict_region_blocks: int = 0
    #: most blocks one request holds at once (the scheduler's admission cap), from the engine limits
    evict_max_blocks: int

    @property
    def rule(self) -> EvictionRule:
        return EvictionRule(self.block_size, self.evict_sink_tokens, self.evict_k, self.evict_alpha,
                            self.evict_min_keep, self.evict_max_keep, self.evict_region_blocks)

    @property
    def prefix_cacheable(self) -> bool:
        return False

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        return self.rule.max_resident_blocks(max_model_len, max_in_flight_tokens)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        blocks = self.max_admission_blocks_per_request(vllm_config.max_in_flight_tokens,
                                                       vllm_config.model_config.max_model_len)
        return blocks * self.page_size_bytes

    @classmethod
    def merge(cls, specs: list["EvictingAttentionSpec"]) -> "EvictingAttentionSpec":
        assert all(isinstance(s, EvictingAttentionSpec) for s in specs), \
            "every layer of an evicting KV-cache group must evict"
        rules = {s.rule for s in specs}
        assert len(rules) == 1, f"every layer of a KV-cache group must share one eviction rule, got {rules}"
        base = FullAttentionSpec.merge(specs)  # type: ignore[arg-type]
        own = {f.name: getattr(specs[0], f.name) for f in dataclasses.fields(cls)
               if f.name.startswith("evict_")}
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(FullAttentionSpec)}, **own)


class EvictingManager(FullAttentionManager):
    """Frees each request's blocks ``[head_blocks, free_end(processed))`` (never a prefix-cache hit)."""

    def __init__(self, kv_cache_spec: EvictingAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.rule = kv_cache_spec.rule
        # admit by the bounded footprint, like vLLM's sliding-window manager (vLLM passes that cap
        # only to its own recycling specs, so the spec carries it)
        self.max_admission_blocks_per_request = kv_cache_spec.evict_max_blocks

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        end = self.rule.free_end(processed_computed_tokens)
        self._remove_blocks_in_range(request_id, self.rule.head_blocks, end)


_REGISTERED = False


def register() -> None:
    """Map :class:`EvictingAttentionSpec` to :class:`EvictingManager` in vLLM's spec registry
    (built-ins first: the registry skips them once it is non-empty). Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(EvictingAttentionSpec, EvictingManager, uniform_type_base_spec=FullAttentionSpec)
    _REGISTERED = True


def evicting_spec(spec: FullAttentionSpec, rule: EvictionRule, max_in_flight_tokens: int,
                  max_model_len: int) -> EvictingAttentionSpec:
    """``spec`` (already customized by the backend) as an evicting spec with ``rule``.

    ``max_in_flight_tokens`` / ``max_model_len``: the engine's limits (``VllmConfig``), which size
    the per-request admission cap."""
    register()
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(FullAttentionSpec)}
    return EvictingAttentionSpec(**fields, evict_sink_tokens=rule.sink_tokens, evict_k=rule.k,
                                 evict_alpha=rule.alpha, evict_min_keep=rule.min_keep, evict_max_keep=rule.max_keep,
                                 evict_region_blocks=rule.region_blocks,
                                 evict_max_blocks=rule.max_resident_blocks(max_model_len, max_in_flight_tokens))


def check_engine_config(vllm_config) -> None:
    """Refuse, at start-up, what eviction cannot serve (raises ``ValueError`` naming the setting)."""
    problems = []
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append("prefix caching is on (evicted requests rewrite their blocks; pass "
                        "--no-enable-prefix-caching / enable_prefix_caching=False)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is on (draft tokens would move the eviction point)")
    if vllm_config.kv_transfer_config is not None:
        problems.append("a KV connector is configured (it reads blocks by position)")
    if problems:
        raise ValueError("vllm_sparse setting evict cannot be used because " + "; ".join(problems))


def compact_block_table(rule: EvictionRule, block_table: torch.Tensor, seq_lens: torch.Tensor,
                        query_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every request's live blocks, front-packed: ``[sink blocks | kept region | blocks from free_end(p) on]``.

    Args:
        block_table: ``[B, max_blocks]`` the worker's table (stale ids where blocks were freed).
        seq_lens: ``[B]`` context lengths including this step's tokens; ``query_lens``: ``[B]``
            this step's tokens, so ``p = seq_lens - query_lens`` were processed before it.
    Returns:
        ``(table, lens)``: ``[B, max_blocks]`` int32 (entries past a request's live blocks repeat
        its last one, never read) and ``[B]`` int32 lengths of the compacted sequences. The
        step's query tokens stay the last ``query_lens`` tokens of each compacted sequence.
    """
    seq = seq_lens.long()
    end = rule.free_end_tensor(seq - query_lens.long())  # [B] first live tail block
    s = rule.head_blocks
    skipped = (end - s).clamp_min(0)
    cols = torch.arange(block_table.shape[1], device=block_table.device)[None, :]
    src = torch.where(cols < s, cols, cols + skipped[:, None])
    last = ((seq + rule.block_size - 1) // rule.block_size - 1).clamp_min(0)
    src = torch.minimum(src, last[:, None])
    table = block_table.gather(1, src).to(torch.int32)
    return table, (seq - skipped * rule.block_size).to(torch.int32)


@dataclass
class MergePlan:
    """This step's merges into the kept region (scored eviction), shared by every layer.

    Attributes:
        rows: ``(block_table row, first, end)`` per request whose blocks ``[first, end)`` leave the
            recent window in this step (the scheduler frees them before the next one).
        block_table: the worker's uncompacted table ``[B, max_blocks]``.
    """

    rows: list[tuple[int, int, int]]
    block_table: torch.Tensor


def plan_merges(rule: EvictionRule, block_table: torch.Tensor, seq_lens: torch.Tensor,
                query_lens: torch.Tensor) -> MergePlan | None:
    """Which requests' blocks leave the live tail in this step (``None``: none, or no kept region).

    Blocks ``[free_end(p), free_end(p + q))`` are attended in this step (they are still in the
    tail) and freed by the scheduler right after it, so their tokens compete for the region now.
    """
    if rule.region_blocks == 0:
        return None
    seq = seq_lens.long()
    lo = rule.free_end_tensor(seq - query_lens.long())
    hi = rule.free_end_tensor(seq)
    idx = torch.nonzero(hi > lo).flatten().tolist()
    if not idx:
        return None
    return MergePlan(rows=[(b, int(lo[b]), int(hi[b])) for b in idx], block_table=block_table)


def merge_into_region(cache, plan: MergePlan, rule: EvictionRule, policy, write) -> None:
    """Per request and KV head: keep the best ``region_blocks × block_size`` of (the region's tokens
    ∪ the leaving blocks' tokens) by ``policy.score``, written back into the region.

    The score reads the keys (``knorm``) and, for a policy that keeps per-token state (``h2o``,
    ``tova``, ``snapkv``: ``keeps_token_state``), that state as ``TokenState.stored``, read from the
    tokens' blocks (``cache.token_scores``) and moved along with the tokens. Each head keeps its
    own tokens in its own slots of the region blocks (a block holds every head in its own slot),
    so heads never compete. Keys are stored after RoPE: a moved token keeps its position's
    rotation. ``write(key, value, slots, cache)`` is the backend's K/V write (it refreshes the
    page summaries too). One loop iteration per merging request: a request crosses a block
    boundary once per ``block_size`` decode steps (more while a prefill chunk passes).
    """
    from vllm_sparse.policies import TokenState

    s, r, bs = rule.sink_blocks, rule.region_blocks, rule.block_size
    h = cache.num_kv_heads
    heads = torch.arange(h, device=cache.device)
    offsets = torch.arange(bs, device=cache.device)
    stateful = policy.keeps_token_state
    for b, lo, hi in plan.rows:
        row = plan.block_table[b].long()
        region = row[s:s + r]
        ids = torch.cat([region, row[lo:hi]])
        keys = cache.key_cache[ids].reshape(-1, h, cache.head_size)  # [T, H, D] copies
        values = cache.value_cache[ids].reshape(-1, h, cache.head_size)
        stored = cache.token_scores[ids].permute(1, 0, 2).reshape(h, -1) if stateful else None  # [H, T]
        scores = policy.score(TokenState(keys=keys, page_size=bs, stored=stored))  # [H, T]
        top = scores.topk(r * bs, dim=1).indices.sort(dim=1).values  # [H, r*bs], ties: lower token
        slots = (region[:, None] * bs + offsets).flatten()
        write(keys[top.T, heads], values[top.T, heads], slots, cache)
        if stateful:  # the kept tokens' state moves with them
            cache.token_scores[region] = stored.gather(1, top).view(h, r, bs).permute(1, 0, 2)


def reset_scores(cache, slot_mapping: torch.Tensor, value: float = 0.0) -> None:
    """Newly written tokens start at ``value`` (the policy's ``new_token_state``: no accumulated
    attention for H2O/TOVA, ``+inf`` (kept) for SnapKV); their block may be a reused one."""
    slots = slot_mapping.long()
    slots = slots[slots >= 0]
    bs = cache.block_size
    cache.token_scores[slots // bs, :, slots % bs] = value


def update_token_state(query: torch.Tensor, cache, block_table: torch.Tensor, seq_lens: torch.Tensor,
                       query_start_loc: torch.Tensor, scale: float, policy) -> None:
    """The per-token state of ``policy`` (``keeps_token_state``) in ``cache.token_scores`` (float32)
    after this step: ``policy.update_state`` of the state each resident token holds and the step's
    queries over the resident keys (:class:`~vllm_sparse.policies.AttentionStep`), written back
    unless it returns ``None``.

    Args are the step's compacted view (``block_table``/``seq_lens`` after :func:`compact_block_table`),
    so the attention a policy computes is attention over the resident tokens, causal for prefill
    chunks. ``query``: ``[num_tokens, num_heads, head_size]``. The decode requests (one query each)
    go through one batched call; each prefill chunk through its own. Each reads every resident key once.
    """
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    rows = [b for b in range(len(lens)) if qsl[b + 1] - qsl[b] > 0 and lens[b] > 0]
    decodes = [b for b in rows if qsl[b + 1] - qsl[b] == 1]
    groups = ([decodes] if decodes else []) + [[b] for b in rows if qsl[b + 1] - qsl[b] > 1]
    for group in groups:
        _update_rows(query, cache, block_table, seq_lens, qsl, scale, policy, group)


def _update_rows(query, cache, block_table, seq_lens, qsl: list[int], scale: float, policy, rows: list[int]) -> None:
    """:func:`update_token_state` for the requests ``rows``, which all have ``M`` queries in this step:
    keys gathered to ``[R, N, H, D]`` (``N`` = the longest), the state to ``[R, H, N]``."""
    from vllm_sparse.policies import AttentionStep

    h, d, bs = cache.num_kv_heads, cache.head_size, cache.block_size
    dev = block_table.device
    idx = torch.tensor(rows, device=dev)
    lens = seq_lens[idx].long()
    n_max = int(lens.max())
    nb = -(-n_max // bs)
    blocks = block_table[idx, :nb].long().clamp_min(0)  # [R, nb]; entries past a length are never written
    keys = cache.key_cache[blocks].reshape(len(rows), nb * bs, h, d)[:, :n_max]  # [R, N, H, D]
    stored = cache.token_scores[blocks].permute(0, 2, 1, 3).reshape(len(rows), h, nb * bs)[:, :, :n_max]  # [R, H, N]
    m = qsl[rows[0] + 1] - qsl[rows[0]]
    first = torch.tensor([qsl[b] for b in rows], device=dev)
    queries = query[first[:, None] + torch.arange(m, device=dev)]  # [R, M, H*G, D]
    new = policy.update_state(stored, AttentionStep(keys=keys, queries=queries, lens=lens, scale=scale))
    if new is None:
        return
    r, p = (torch.arange(n_max, device=dev)[None, :] < lens[:, None]).nonzero(as_tuple=True)
    cache.token_scores[blocks[r, p // bs], :, p % bs] = new[r, :, p].float()
