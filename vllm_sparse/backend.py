"""The vLLM attention backend: dense prefill, k·n^α-sparse decode, on the plugin's own paged layout.

Selected with ``--attention-backend CUSTOM`` (registered by :mod:`vllm_sparse.plugin`);
settings come from ``additional_config={"vllm_sparse": {...}}`` (:class:`~vllm_sparse.config.SparseConfig`).

Per step (plan, in :class:`SparseMetadataBuilder.build`, once for all layers): split the
batch into decodes (query length 1, ordered first by vLLM because
``reorder_batch_threshold = 1``) and prefills; compute each decode request's attended
token count with the configured policy (dense below ``dense_below``).

Per layer (run, in :class:`SparseAttentionImpl`): ``do_kv_cache_update`` writes K/V and the
page key min/max into the layout of :mod:`vllm_sparse.kernels.layout`; ``forward`` runs sparse
decode (or dense decode where the budget covers the context) for decodes and dense causal
attention for (chunked) prefills.

One page is one KV block: the backend sets vLLM's block size to ``page_size``. On the CPU
platform keys are stored in vLLM's CPU kernel layout and every attention runs through vLLM's
own CPU paged-attention op (:mod:`vllm_sparse.cpu_attention`): prefill over the requests' block
tables, whole-page decode (the ``exact_pages`` and ``quest`` selectors) over compacted per-head
block tables of the selected pages. The other selectors (``token``, ``page``, ``recent``,
third-party ones: :mod:`vllm_sparse.kernels.selectors`) and ``granularity="query_head"`` run
the torch reference on CPU. CUDA tensors take the Triton kernels (:mod:`vllm_sparse.kernels.ops`):
the *CUDA route* — the builder plans no CPU metadata, the cache is the plugin's own layout (keys
``[block_size, head_size]`` rows) and every layer runs :meth:`SparseAttentionImpl._forward_cuda`.

Test-only switch: ``VLLM_SPARSE_EMULATE_CUDA=1`` makes an engine on the CPU platform take the CUDA
route on its CPU tensors, with the Triton kernels run by the Triton interpreter — so the CUDA route's
code runs inside real vLLM on a machine without a GPU (``tests/vllm_sparse/test_cuda_route.py``).
It needs ``TRITON_INTERPRET=1`` set before the kernels are imported (a ``ValueError`` otherwise), is
read once by the builder's and the layers' constructors, is ignored on a GPU (the route is the
CUDA one anyway), and is far too slow for anything but tests: never set it to serve.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout, SlidingWindowSpec

from vllm_sparse import cpu_attention, stats
from vllm_sparse.config import DEFAULT_RESELECT_EVERY, SparseConfig
from vllm_sparse.cpu_tuning import huge_pages, tune_malloc
from vllm_sparse.kernels import PagedKVCache, summary_states
from vllm_sparse.kernels.layout import score_states
from vllm_sparse.kernels import ops
from vllm_sparse.kernels.selection import quest_attended

logger = init_logger("vllm.sparse")  # a child of vLLM's logger: shares its handler and format


def _score_rows(config: SparseConfig, head_size: int, dtype: torch.dtype, block_size: int) -> int:
    """Extra rows per head slot for the eviction policy's per-token state (``keeps_token_state``), else 0."""
    if config.evict is None:
        return 0
    from vllm_sparse.policies import get_policy_class

    if not get_policy_class(config.evict).keeps_token_state:
        return 0
    return score_states(block_size, head_size, dtype)


#: the test-only switch of the module docstring: the CUDA route on the CPU platform, under the Triton interpreter
EMULATE_CUDA_ENV = "VLLM_SPARSE_EMULATE_CUDA"


def cuda_route(on_cpu: bool) -> bool:
    """Whether this engine's attention takes the CUDA route: on a GPU always; on the CPU platform only
    under the test-only switch ``VLLM_SPARSE_EMULATE_CUDA=1`` (module docstring), which needs
    ``TRITON_INTERPRET=1``. Read once, when the builder and the layers are built.

    Raises:
        ValueError: the switch holds a value other than ``0``/``1``, or is set without the interpreter.
    """
    value = os.environ.get(EMULATE_CUDA_ENV, "0")
    if value not in ("0", "1", ""):
        raise ValueError(f"{EMULATE_CUDA_ENV}={value!r}: allowed are 1 (tests only: the CUDA route emulated "
                         "on CPU tensors) and 0 or unset")
    if value != "1":
        return not on_cpu
    if not on_cpu:
        logger.warning_once("vllm-sparse: %s=1 is ignored on a GPU (its route is the CUDA one)", EMULATE_CUDA_ENV)
        return True
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"{EMULATE_CUDA_ENV}=1 (tests only: the CUDA route on CPU tensors) runs the Triton kernels "
                         f"in the Triton interpreter and needs TRITON_INTERPRET=1 set before they are imported; got "
                         f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}")
    logger.warning_once("vllm-sparse: %s=1: the CUDA route on CPU tensors through the Triton interpreter "
                        "(a test-only switch; very slow)", EMULATE_CUDA_ENV)
    return True


def _sparse_config(vllm_config: VllmConfig | None = None) -> SparseConfig:
    cfg = vllm_config if vllm_config is not None else get_current_vllm_config()
    sparse = SparseConfig.from_additional_config(cfg.additional_config)
    # the layers are built before vLLM asks for KV-cache specs, and customize_spec gets no config
    SparseAttentionBackend.process_config = sparse
    SparseAttentionBackend.process_limits = (cfg.max_in_flight_tokens, cfg.model_config.max_model_len)
    return sparse


class SparseAttentionBackend(AttentionBackend):
    """Dense-model attention backend that is sparse inside (``is_sparse()`` stays False)."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]
    #: this process's settings, recorded when the attention layers are built
    process_config: ClassVar[SparseConfig | None] = None
    #: this process's engine limits (max in-flight tokens, max model length): size eviction's admission cap
    process_limits: ClassVar[tuple[int, int] | None] = None

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["SparseAttentionImpl"]:
        return SparseAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["SparseMetadataBuilder"]:
        return SparseMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        """One page per KV block: the block size is ``page_size`` (vLLM picks it as the preferred size)."""
        try:
            return [_sparse_config().page_size]
        except Exception:  # no vLLM config in scope (e.g. a registry listing): any page size
            return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [64, 128, 256]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # the page-metadata view needs head-major block interiors (see kernels/layout.py)
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        """Sliding-window layers attend exactly their window, densely: through vLLM's CPU op, or on the
        CUDA route through the Triton kernels (which read only the window's blocks)."""
        return True

    @classmethod
    def supports_sink(cls) -> bool:
        """Attention sinks (gpt-oss) go to vLLM's CPU op or the Triton kernels, the sparse decode included."""
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Ask vLLM for ``block_size / page_size`` extra states per head slot: they hold the page key min/max.

        ``tokens_per_state = block_size / (block_size + pages)`` makes each head slot
        ``block_size + pages`` rows of ``2 * head_size`` — exactly ``1 / page_size`` more bytes.
        """
        if spec.num_head_slots is not None or spec.state_content_bytes is not None or spec.tokens_per_state != 1:
            raise ValueError(f"vllm-sparse cannot combine with a packed KV-cache spec ({spec})")
        if cls.process_config is None:
            raise RuntimeError("vllm-sparse: KV-cache spec requested before any attention layer was built")
        bs, page_size = spec.block_size, cls.process_config.page_size
        if isinstance(spec, SlidingWindowSpec) and bs == 1:
            # vLLM's probe of a sliding-window layer's bytes per token: it then builds the layer's spec
            # itself (without this hook) and pads its page to the full-attention layers' page, whose
            # extra rows then hold the page summaries (SparseAttentionImpl._cache)
            return spec
        if bs != page_size:
            raise ValueError(
                f"vllm-sparse needs the KV block size to equal its page_size={page_size} (one page per block); "
                f"got block_size={bs}. Drop --block-size, or set both to the same value."
            )
        states = bs + summary_states(bs, page_size) + _score_rows(cls.process_config, spec.head_size, spec.dtype, bs)
        spec = dataclasses.replace(spec, tokens_per_state=Fraction(bs, states))
        rule = cls.process_config.eviction_rule(bs)
        if rule is None:
            return spec
        from vllm_sparse import eviction

        return eviction.evicting_spec(spec, rule, *cls.process_limits)


@dataclass
class SparseAttentionMetadata:
    """One step's plan, shared by every layer. Decode requests come first."""

    num_actual_tokens: int
    num_decodes: int
    num_decode_tokens: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64
    max_query_len: int
    max_seq_len: int
    # decode plan (None when the step has no decode requests)
    decode_attended: torch.Tensor | None  # [num_decodes] int64, tokens attended per request
    decode_capacity: int  # max(decode_attended): static width of the index buffers
    decode_is_dense: bool  # every decode request attends its whole context (and force_sparse is off)
    # fused CPU path (None on CUDA / when unused)
    cpu_decode: "cpu_attention.DecodePlan | None" = None
    cpu_reuse: "cpu_attention.SelectionReuse | None" = None  # reselect_every: the builder's reuse state
    cpu_prefill_metadata: torch.Tensor | None = None  # scheduler metadata of the dense part of the batch
    cpu_dense_metadata: torch.Tensor | None = None  # the whole batch dense (layers below dense_layers)
    # scored eviction: blocks leaving the recent window this step, merged into the kept region
    evict_merge: "MergePlan | None" = None


def _cpu_isa(config: SparseConfig, block_size: int, dtype: torch.dtype, head_size: int) -> str:
    """vLLM's CPU attention ISA for this plugin's caches (builder and layers must agree): AMX's packed
    layout where the stock backend would use it too and only the fused decode reads the cache
    (no torch-reference selection, no eviction: those read ``[block_size, head_size]`` rows)."""
    params = config.select_params
    fused_only = params.selector.cpu_fused and not params.per_query_head and config.evict is None
    return cpu_attention.cpu_isa(block_size, dtype, head_size, amx_ok=fused_only)


def _sparse_layers(vllm_config: VllmConfig, layer_names=None) -> dict:
    """The model's attention layers served by this backend (of ``layer_names`` only, if given)."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
    return {name: layer for name, layer in layers.items() if isinstance(layer.impl, SparseAttentionImpl)}


def _layer_windows(vllm_config: VllmConfig, layer_names) -> set[int | None]:
    """The sliding windows of a KV-cache group's layers (``None``: a full-attention layer)."""
    return {layer.impl.sliding_window for layer in _sparse_layers(vllm_config, layer_names).values()}


def _first_full_layer(vllm_config: VllmConfig) -> str | None:
    """The first full-attention layer of the model (by layer index), whose group records the step's sparsity."""
    from vllm.model_executor.models.utils import extract_layer_index

    full = [name for name, layer in _sparse_layers(vllm_config).items() if layer.impl.sliding_window is None]
    return min(full, key=extract_layer_index, default=None)


class SparseMetadataBuilder(AttentionMetadataBuilder[SparseAttentionMetadata]):
    # Decode-step index buffers are not yet fixed-capacity on this path: no CUDA graphs.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    reorder_batch_threshold: int = 1

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.config = _sparse_config(vllm_config)
        self._init_reorder_batch_threshold(1)
        self.spec = kv_cache_spec
        self.num_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
        windows = _layer_windows(vllm_config, layer_names)
        #: every layer of this group has a sliding window (vLLM's hybrid KV-cache manager gives them
        #: their own group): the group attends its window densely and plans no sparse decode
        self.windowed = bool(windows) and None not in windows
        #: some do: they need the whole batch's dense metadata (the hybrid manager is off)
        self.some_windowed = any(w is not None for w in windows)
        self.window = windows.pop() if self.windowed and len(windows) == 1 else -1
        #: the one builder of a step that records its sparsity (the group of the first full-attention layer)
        self.records_stats = _first_full_layer(vllm_config) in layer_names
        self.dtype = kv_cache_spec.dtype
        self.cpu = not cuda_route(device.type == "cpu")  # the CPU route (vLLM's CPU op, the fused decode)
        self.isa = _cpu_isa(self.config, kv_cache_spec.block_size, self.dtype, kv_cache_spec.head_size) if self.cpu else None
        if self.cpu:
            logger.info_once("vllm-sparse: vLLM's CPU attention kernels with ISA %s (%s K/V layout)", self.isa,
                             "AMX-packed" if self.isa == "amx" else "key-transposed")
        #: the fused CPU decode serves kv_head-granular quest; the rest run the torch reference
        #: blocks each request frees (``evict``); the builder compacts block tables to the live ones
        self.evict_rule = None if self.some_windowed else self.config.eviction_rule(kv_cache_spec.block_size)
        if self.evict_rule is not None:
            from vllm_sparse.eviction import check_engine_config

            check_engine_config(vllm_config)
        self.params = params = self.config.select_params_for(kv_cache_spec.head_size)
        self.cpu_fused_decode = self.cpu and params.selector.cpu_fused and not params.per_query_head and not self.windowed
        #: reselect_every > 1 on the fused CPU path: the one owner of the reuse state (the last decode
        #: batch and each layer's kept selection), handed to the layers in the metadata
        self.reuse = (cpu_attention.SelectionReuse(self.config.reselect_every)
                      if self.cpu_fused_decode and self.config.reselect_every > 1 else None)
        #: reselect_candidate_factor: candidates of a row refreshing its kept pages (the gate failed);
        #: None: it selects afresh (no gate, or Quest's rule, whose candidates are its pages)
        cf = params.selector.cpu_candidate_factor(params.candidate_factor) if self.cpu_fused_decode else 1.0
        rcf = self.config.reselect_candidate_factor
        self._refresh_factor = (min(rcf, cf) if rcf is not None and cf > 1 and self.config.reselect_similarity > 0
                                else None)
        if self.config.reselect_every > 1 and not self.cpu_fused_decode:
            # the default is the fused CPU path's; a value the user chose gets a warning
            (logger.info_once if self.config.reselect_every == DEFAULT_RESELECT_EVERY else logger.warning_once)(
                "vllm-sparse: reselect_every=%d applies to the fused CPU path (exact_pages/quest, kv_head "
                "granularity) only; this engine selects every step", self.config.reselect_every)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> SparseAttentionMetadata:
        cm, cfg, params = common_attn_metadata, self.config, self.params
        context = cm.seq_lens
        merge = None
        if self.evict_rule is not None:  # attend to the live blocks only: [sink blocks | region | recent tail]
            from vllm_sparse.eviction import compact_block_table, plan_merges

            query_lens = cm.query_start_loc[1:] - cm.query_start_loc[:-1]
            merge = plan_merges(self.evict_rule, cm.block_table_tensor[: cm.num_reqs], cm.seq_lens[: cm.num_reqs],
                                query_lens[: cm.num_reqs])
            table, lens = compact_block_table(self.evict_rule, cm.block_table_tensor[: cm.num_reqs],
                                              cm.seq_lens[: cm.num_reqs], query_lens[: cm.num_reqs])
            cm = dataclasses.replace(cm, block_table_tensor=table, seq_lens=lens, max_seq_len=int(lens.max()))
        num_decodes, _, num_decode_tokens, _ = split_decodes_and_prefills(cm, decode_threshold=1)
        if num_decode_tokens != num_decodes:  # zero-length padded requests: take the general path
            num_decodes = num_decode_tokens = 0
        attended, capacity, dense, cpu_decode = None, 0, True, None
        if num_decodes and not self.windowed:
            seq = cm.seq_lens[:num_decodes]
            attended = torch.minimum(cfg.attended(context[:num_decodes]), seq.long())  # budget by true length
            dense = bool((attended >= seq).all()) and not cfg.force_sparse
            capacity = params.index_capacity(int(attended.max()), cfg.page_size)
            if params.selector.whole_pages:  # whole pages: what the kernels read
                attended_total = int(quest_attended(seq, attended, cfg.page_size, params.sink_tokens,
                                                    params.local_window).sum())
            else:
                attended_total = int(torch.minimum(attended, seq.long()).sum())
            if self.cpu_fused_decode and not dense:
                cpu_decode = cpu_attention.plan_decode(
                    seq, attended, cm.block_table_tensor[:num_decodes], params, block_size=self.spec.block_size,
                    num_heads=self.num_heads, num_kv_heads=self.spec.num_kv_heads, head_size=self.spec.head_size,
                    dtype=self.dtype, isa=self.isa, refresh_factor=self._refresh_factor)
                if self.reuse is not None:
                    self.reuse.plan(cpu_decode)
                attended_total = cpu_decode.attended_tokens  # what the op reads (kept selections may hold a page more)
            if cpu_decode is None and self.reuse is not None:
                self.reuse.reset()  # the layers' selections of this step are not the next step's
            if self.records_stats:
                stats.record_step(num_decodes, attended_total, int(context[:num_decodes].sum()))
        prefill_md = dense_md = None
        if self.cpu:  # dense part of the batch: everything when decode is dense, else the prefills
            first = 0 if dense else num_decodes
            if first < cm.num_reqs:
                prefill_md = self._cpu_metadata(cm, first)
            if not dense and (cfg.dense_layers or self.some_windowed):
                dense_md = self._cpu_metadata(cm, 0)
        return SparseAttentionMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens,
            query_start_loc=cm.query_start_loc,
            seq_lens=cm.seq_lens,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            decode_attended=attended,
            decode_capacity=capacity,
            decode_is_dense=dense,
            cpu_decode=cpu_decode,
            cpu_reuse=self.reuse if cpu_decode is not None else None,
            cpu_prefill_metadata=prefill_md,
            cpu_dense_metadata=dense_md,
            evict_merge=merge,
        )

    def _cpu_metadata(self, cm: CommonAttentionMetadata, first: int) -> torch.Tensor:
        """vLLM CPU op's scheduler metadata for requests ``first:`` of the batch, all dense."""
        return cpu_attention.scheduler_metadata(
            cm.seq_lens[first:], cm.query_start_loc[first:] - cm.query_start_loc[first], self.num_heads,
            self.spec.num_kv_heads, self.spec.head_size, self.dtype, self.isa, self.window)


class SparseAttentionImpl(AttentionImpl[SparseAttentionMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **kwargs,
    ) -> None:
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        self.cpu = not cuda_route(on_cpu)  # the CPU route: vLLM's CPU key layout and op
        sinks = kwargs.get("sinks")
        unsupported = {
            "alibi_slopes": alibi_slopes is not None,
            f"attn_type={attn_type}": attn_type != AttentionType.DECODER,
            f"kv_cache_dtype={kv_cache_dtype}": kv_cache_dtype not in SparseAttentionBackend.supported_kv_cache_dtypes,
        }
        bad = [name for name, hit in unsupported.items() if hit]
        if bad:
            raise NotImplementedError(
                f"vllm-sparse (attention backend CUSTOM) does not support {', '.join(bad)} on this model's "
                "attention layers; use another backend (or AttentionConfig.backend_per_kind to keep such "
                "layers on a stock backend)."
            )
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.config = _sparse_config()
        #: a sliding-window layer attends exactly its window, densely (vLLM frees the blocks behind it)
        self.sliding_window = sliding_window
        self.logits_soft_cap = float(logits_soft_cap or 0.0)
        self.sinks = sinks  # the layer's parameter: its values are loaded after this constructor
        self._softmax: cpu_attention.Softmax | None = None
        if self.config.evict is not None and sliding_window is not None:
            raise ValueError(f"vllm_sparse setting evict={self.config.evict!r} cannot be used with a model that has "
                             "sliding-window layers (not supported yet); drop evict (null) for this model")
        if on_cpu:
            tune_malloc()
        self._views: tuple[int, PagedKVCache] | None = None
        self._dense_layer: bool | None = None  # below dense_layers (known at the first forward)
        # the eviction policy object (scorer of the merges, kind of per-token state); None without evict
        self._evict_policy = self.config.evict_policy
        self.params = self.config.select_params_for(head_size)  # the selection, rescored dims resolved

    def reconfigure(self, config: SparseConfig) -> None:
        """Take new settings in a running engine (``benchmarks/ablation.py``: every setting decoded from
        the same prefill). Only the selection may change: ``page_size`` and ``evict`` fix the cache's
        layout, so a change of either is refused (``ValueError``)."""
        if config.page_size != self.config.page_size or config.evict != self.config.evict:
            raise ValueError(f"page_size and evict fix the KV cache's layout: {self.config.page_size}/"
                             f"{self.config.evict!r} cannot become {config.page_size}/{config.evict!r} in a running engine")
        self.config, self._evict_policy, self._dense_layer = config, config.evict_policy, None
        self.params = config.select_params_for(self.head_size)

    @property
    def softmax(self) -> "cpu_attention.Softmax":
        """The window, soft cap and sinks vLLM's CPU op and the Triton kernels take (built at the first
        forward: the sinks are a weight, loaded after the constructor, cast to float32 as vLLM's CPU
        backend does)."""
        if self._softmax is None:
            sinks = self.sinks
            if sinks is not None and sinks.dtype not in (torch.bfloat16, torch.float32):
                sinks = sinks.float()
            self._softmax = cpu_attention.Softmax(-1 if self.sliding_window is None else int(self.sliding_window),
                                                  self.logits_soft_cap, sinks)
        return self._softmax

    def _is_dense_layer(self, layer: AttentionLayer) -> bool:
        if self._dense_layer is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self._dense_layer = extract_layer_index(layer.layer_name) < self.config.dense_layers
        return self._dense_layer

    def _cache(self, kv_cache: torch.Tensor) -> PagedKVCache:
        """Strided views of this layer's cache (built once per cache tensor); the CPU route: vLLM's CPU key
        layout; the CUDA route: the plugin's own (:mod:`vllm_sparse.kernels.layout`)."""
        key = kv_cache.data_ptr()
        if self._views is None or self._views[0] != key:
            rows = _score_rows(self.config, self.head_size, kv_cache.dtype, self.config.page_size)  # block = page
            kv_cache = self._full_page_view(kv_cache, rows)
            amx = self.cpu and _cpu_isa(self.config, self.config.page_size, kv_cache.dtype, self.head_size) == "amx"
            cache = PagedKVCache.from_raw(kv_cache, self.num_kv_heads, self.config.page_size,
                                          key_transposed=self.cpu and not amx, score_rows=rows, amx=amx)
            if self.cpu:
                huge_pages(kv_cache)  # sparse reads hop between blocks: spare them the TLB misses
            self._views = (key, cache)
        return self._views[1]

    def _full_page_view(self, kv_cache: torch.Tensor, score_rows: int) -> torch.Tensor:
        """A sliding-window layer's cache in the plugin's layout.

        vLLM sizes a sliding-window layer's page itself (``block_size`` K/V rows per head slot, no
        summary rows) and pads it to the full-attention layers' page, whose layout is this plugin's
        (``block_size + block_size / page_size`` rows per head slot). The padded page holds exactly
        that many bytes, so it is viewed in the same layout: every layer then writes and reads its
        cache alike (the window's layers simply never consult their page summaries)."""
        nb, slots, states, c = kv_cache.shape
        page = self.config.page_size
        full = page + summary_states(page, page) + score_rows
        if states == full:
            return kv_cache
        if self.sliding_window is None or states != page or kv_cache.stride(0) != slots * full * c:
            raise ValueError(f"vllm-sparse: the KV cache of a layer has {states} rows of {slots} head slots and "
                             f"block stride {kv_cache.stride(0)}; expected {full} rows (page_size={page} tokens "
                             "plus the page summaries), or a sliding-window layer's page padded to that")
        return kv_cache.as_strided((nb, slots, full, c), (kv_cache.stride(0), full * c, c, 1))

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if self.kv_sharing_target_layer_name is not None:
            return  # this layer reads another layer's cache
        cache = self._cache(kv_cache)
        if self.cpu:
            cpu_attention.write_kv(key, value, slot_mapping, cache)
        else:
            ops.write_kv(key, value, slot_mapping, cache, force_triton=True)
        if cache.token_scores is not None:  # the eviction policy's per-token state: new tokens start anew
            from vllm_sparse.eviction import reset_scores

            reset_scores(cache, slot_mapping[: key.shape[0]], self._evict_policy.new_token_state)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: SparseAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query: [num_tokens, num_heads, head_size]; output: [num_tokens, num_heads, head_size]."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("vllm-sparse does not support fused output quantization")
        if attn_metadata is None:  # memory-profiling run
            return output
        md = attn_metadata
        cache = self._cache(kv_cache)
        # a windowed layer is dense (its window): evict is refused with windows, so no eviction state below
        dense_layer = self.sliding_window is not None or (self.config.dense_layers > 0 and self._is_dense_layer(layer))
        if self.cpu:
            self._forward_cpu(layer, query, cache, md, output, dense_layer)
        else:
            self._forward_cuda(query, cache, md, output, dense_layer)
        if cache.token_scores is not None and self.kv_sharing_target_layer_name is None:
            from vllm_sparse.eviction import update_token_state

            n = md.num_actual_tokens
            update_token_state(query[:n], cache, md.block_table, md.seq_lens, md.query_start_loc, self.scale,
                               self._evict_policy)
        if md.evict_merge is not None and self.kv_sharing_target_layer_name is None:
            self._merge_evicted(cache, md.evict_merge)
        return output

    def _merge_evicted(self, cache: PagedKVCache, plan) -> None:
        """Scored eviction: keep the best of the blocks leaving the window in the kept region (after this layer's attention)."""
        from vllm_sparse.eviction import merge_into_region

        write = cpu_attention.write_kv if self.cpu else functools.partial(ops.write_kv, force_triton=True)
        merge_into_region(cache, plan, self.config.eviction_rule(cache.block_size), self._evict_policy, write)

    def _forward_cuda(self, query: torch.Tensor, cache: PagedKVCache, md: SparseAttentionMetadata,
                      output: torch.Tensor, dense_layer: bool) -> torch.Tensor:
        """The Triton kernels: sparse (or dense) decode for the decodes, dense causal attention for the rest,
        with the layer's window (a windowed layer is a dense one: it attends its window), soft cap and sinks.
        ``force_triton``: the same kernels on CPU tensors under the test-only switch (module docstring)."""
        nd, ndt, n = md.num_decodes, md.num_decode_tokens, md.num_actual_tokens
        sm = self.softmax
        if nd:
            q = query[:ndt]
            seq, bt = md.seq_lens[:nd], md.block_table[:nd]
            if md.decode_is_dense or dense_layer:
                output[:ndt] = ops.dense_decode(q, cache, bt, seq, self.scale, max_seq_len=md.max_seq_len,
                                                force_triton=True, window=sm.window, softcap=sm.softcap,
                                                sinks=sm.sinks)
            else:
                output[:ndt] = ops.sparse_decode(q, cache, bt, seq, md.decode_attended, self.scale, self.params,
                                                 capacity=md.decode_capacity, max_seq_len=md.max_seq_len,
                                                 force_triton=True, softcap=sm.softcap, sinks=sm.sinks)
        if n > ndt:
            qsl = md.query_start_loc[nd:] - ndt
            output[ndt:n] = ops.paged_attention(query[ndt:n], cache, md.block_table[nd:], md.seq_lens[nd:],
                                                qsl, self.scale, max_query_len=md.max_query_len,
                                                max_seq_len=md.max_seq_len, force_triton=True, window=sm.window,
                                                softcap=sm.softcap, sinks=sm.sinks)
        return output

    def _forward_cpu(self, layer: AttentionLayer, query: torch.Tensor, cache: PagedKVCache, md: SparseAttentionMetadata,
                     output: torch.Tensor, dense_layer: bool) -> torch.Tensor:
        """vLLM's CPU op for the dense part of the batch; sparse decodes fused (quest) or by the reference."""
        cfg, softmax = self.config, self.softmax
        nd, ndt, n = md.num_decodes, md.num_decode_tokens, md.num_actual_tokens
        if dense_layer and md.cpu_dense_metadata is not None:
            cpu_attention.attention(query[:n], cache, md.block_table, md.seq_lens, md.query_start_loc,
                                    md.cpu_dense_metadata, self.scale, output[:n], softmax)
            return output
        if nd and not md.decode_is_dense:
            q = query[:ndt]
            if md.cpu_decode is not None:
                reuse, name = md.cpu_reuse, layer.layer_name
                kept = cpu_attention.sparse_decode(q, cache, md.cpu_decode, self.scale, output[:ndt],
                                                   reuse.kept(name) if reuse is not None else None,
                                                   cfg.reselect_similarity, softmax)
                if reuse is not None:  # a later step may keep this selection's rows
                    reuse.keep(name, kept)
            else:
                output[:ndt] = ops.sparse_decode(q, cache, md.block_table[:nd], md.seq_lens[:nd], md.decode_attended,
                                                 self.scale, self.params, softcap=softmax.softcap,
                                                 sinks=softmax.sinks)
            first, t0 = nd, ndt
        else:
            first, t0 = 0, 0
        if n > t0:
            cpu_attention.attention(query[t0:n], cache, md.block_table[first:], md.seq_lens[first:],
                                    md.query_start_loc[first:] - t0, md.cpu_prefill_metadata, self.scale,
                                    output[t0:n], softmax)
        return output
