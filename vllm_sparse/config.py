"""The plugin's settings: one frozen, validated object.

Users pass a plain dict through vLLM — ``LLM(additional_config={"vllm_sparse": {...}})`` or
``--additional-config '{"vllm_sparse": {...}}'`` — and :meth:`SparseConfig.from_dict` turns it
into a :class:`SparseConfig`. Unknown keys and out-of-range values raise one ``ValueError``
that names the key, the value and what is allowed.

Defaults (docs/RESULTS.md "How defaults were chosen" and docs/paper-experiment.md give the evidence):

============== ========= ==============================================================
key            default   meaning
============== ========= ==============================================================
policy         ntopk     the selection policy (``vllm_sparse.policies``): ``ntopk`` (k·n^α),
                         ``topk`` (fixed), ``quest``, ``streaming``, ``dense`` run inside vLLM
                         (``n_alpha``/``fixed_k``: old names of ntopk/topk); ``snapkv``, ``h2o``,
                         ``tova``, ``knorm`` have no decode selection (they run as ``evict``);
                         or a registered third-party name
policy_args    {}        extra arguments of the policy (``budget_tokens``: a fixed budget;
                         ``allocator``: ``"adakv"``; the policy's own fields)
alpha          0.5       exponent α of k·n^α, 0 < α ≤ 1
k              12.0      coefficient k of k·n^α, > 0
min_budget     128       lower clamp of the budget, ≥ sink_tokens + local_window
max_budget     None      upper clamp of the budget (None: no clamp)
sink_tokens    4         first tokens always attended (inside the budget)
local_window   64        most recent tokens always attended (inside the budget); whole-page
                         selections always attend the current token's page, even at 0
page_size      32        tokens per selection page (its key min/max is the page summary);
                         one page is one KV block: sets vLLM's block size (power of two >= 16)
selection      exact_pages  ``exact_pages``: rank pages by their min/max upper bound, rescore
                         the best ``candidate_factor ×`` as many as the budget needs by
                         their exact max q·k, attend the best whole pages; ``quest``: attend
                         the best pages by the bound alone (Quest's rule, reads no key to
                         select); ``token``: exact q·k of every key, top tokens; ``page``:
                         bound-ranked candidate pages, then their top tokens; ``recent``: no
                         scoring, sinks + most recent tokens (StreamingLLM's rule at the same
                         budget, the baseline). Page selections round the budget up to whole
                         pages. Or a registered third-party selector
                         (``vllm_sparse.kernels.selectors``)
candidate_factor 8.0     ``exact_pages``/``page``: candidates per page (token) of the budget
rescore_dims   None      ``exact_pages``: rescore candidates by ``q·k`` over only the
                         ``rescore_dims`` dims of largest ``Σ|q|`` × key range (the keys'
                         spread in that dim over the scored pages; SparQ's approximation,
                         range-weighted: ``kernels.selection.rescore_dims_mask``; reads
                         that fraction of the candidates' keys); None: 3/16 of the head's
                         dims (12 of 64, 24 of 128, 48 of 256); 0 or >= head_size: every
                         dim, the exact max ``q·k``
granularity    kv_head   ``kv_head``: one token set per KV head (GQA group shares it);
                         ``query_head``: one set per query head
dense_below    1024      sequences shorter than this decode densely
dense_layers   0         the first N attention layers decode densely (Quest keeps its
                         first two dense: early layers attend broadly)
reselect_every 16        fused CPU path (``exact_pages``/``quest``): each request selects its
                         pages at most every N decode steps and may attend the same pages in
                         between (per layer and KV head; a request's new page is attended
                         on top of the kept ones; a second new page or a larger budget
                         selects at once; see reselect_similarity). 1: select every step.
                         Other paths (GPU, ``token``/``page``, ``query_head``) select every step
reselect_similarity 0.8  with ``reselect_every > 1``: a (request, KV head) keeps its pages only
                         while its query's cosine similarity to the query it selected them
                         with is >= this (the query heads of its group concatenated); below,
                         it selects at once. 0: keep them for the N steps regardless. Default
                         (null): 0.8, or 0 when reselect_every is 1; set explicitly it needs
                         reselect_every > 1
reselect_candidate_factor 4.0  ``exact_pages`` with the gate: a (request, KV head) whose kept
                         pages fail it rescores only ``reselect_candidate_factor ×`` the
                         budget's pages best by the bound, plus the pages it kept (a
                         refresh, cheaper than selecting afresh; capped at
                         ``candidate_factor``). null: it selects afresh (``candidate_factor``)
force_sparse   False     run the selection even when the budget covers the whole context
                         (tests: checks the sparse path against dense end to end)
evict          None      free KV blocks while requests run: ``streaming`` keeps the sink
                         block and a live tail of the most recent tokens; ``knorm`` /
                         ``h2o`` / ``tova`` / ``snapkv`` also keep a fixed region of the
                         lowest-key-norm / most attended / latest-attended / most voted-for
                         (SnapKV's observation window, per prefill chunk) tokens; the blocks
                         between return to vLLM's pool (see :mod:`vllm_sparse.eviction`)
evict_args     {}        ``streaming``: tokens kept per request: ``k``, ``alpha``,
                         ``min_keep``, ``max_keep`` of clamp(ceil(k·n^α)) (default: the
                         budget keys), or ``keep``: fixed; ``knorm``/``h2o``/``tova``/``snapkv``:
                         ``keep`` (default 1024): sinks + region + window, plus the policy's
                         own arguments (``snapkv``: ``window`` 32, ``kernel`` 7)
============== ========= ==============================================================

The budget (policy ``ntopk``) is the *total* number of tokens attended per head at
length n, sinks and window included: ``min(n, clamp(ceil(k·n^α), min_budget, max_budget))``
— see :mod:`vllm_sparse.policies.budget`.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any, Mapping

import torch

from vllm_sparse.kernels.selection import GRANULARITIES
from vllm_sparse.kernels.selectors import SelectParams, available_selectors, get_selector

from vllm_sparse.policies import BudgetPolicy, Policy, available_policies, get_policy_class
from vllm_sparse.policies.eviction import EvictionRule



def evicting_policies() -> list[str]:
    """Registered policies that can free KV blocks today (``evict``)."""
    return [n for n in available_policies() if get_policy_class(n).frees_blocks]


def vllm_policies() -> list[str]:
    """Registered policies with a decode path inside vLLM (``policy``)."""
    return [n for n in available_policies() if get_policy_class(n).selection != ""]

__all__ = ["SparseConfig", "CONFIG_KEY"]

#: the key under vLLM's ``additional_config`` that holds these settings
CONFIG_KEY = "vllm_sparse"
# the fused CPU path's reuse gate (docs/RESULTS.md, "How defaults were chosen"); the
# similarity applies when reselect_every > 1 and reselect_similarity is not set
DEFAULT_RESELECT_EVERY = 16
DEFAULT_RESELECT_SIMILARITY = 0.8



def _err(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"vllm_sparse setting {key}={value!r} is invalid; allowed: {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)



#: ``rescore_dims`` left unset: this fraction of a head's dims (12 of SmolLM2's 64, where it was tuned)
RESCORE_FRACTION = Fraction(3, 16)

@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """Validated settings of the sparse-attention backend (see the module docstring)."""

    policy: str = "ntopk"
    policy_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    alpha: float = 0.5
    k: float = 12.0
    min_budget: int = 128
    max_budget: int | None = None
    sink_tokens: int = 4
    local_window: int = 64
    page_size: int = 32
    selection: str = "exact_pages"
    candidate_factor: float = 8.0
    rescore_dims: int | None = None  # 3/16 of the head's dims (rescore_dims_for)
    granularity: str = "kv_head"
    dense_below: int = 1024
    dense_layers: int = 0
    reselect_every: int = DEFAULT_RESELECT_EVERY
    reselect_similarity: float | None = None  # 0.8 with reselect_every > 1, else 0
    reselect_candidate_factor: float | None = 4.0
    force_sparse: bool = False
    evict: str | None = None
    evict_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate()
        if self.reselect_similarity is None:
            object.__setattr__(self, "reselect_similarity", DEFAULT_RESELECT_SIMILARITY if self.reselect_every > 1 else 0.0)
        # the policy object is derived state: built once, never mutated
        object.__setattr__(self, "policy_args", dict(self.policy_args))
        object.__setattr__(self, "evict_args", dict(self.evict_args))
        object.__setattr__(self, "_evict_rule", self._build_evict_rule())
        object.__setattr__(self, "_evict_policy", self._build_evict_policy())
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        policy = get_policy_class(self.policy).from_settings(settings, self.policy_args)
        if policy.selection == "":
            why = (f"{self.policy!r} has no decode selection path; it evicts: use evict={self.policy!r}"
                   if policy.frees_blocks else
                   f"{self.policy!r} is implemented as a reference scorer in vllm_sparse.policies only")
            raise _err("policy", self.policy, f"one with a decode path in vLLM: {vllm_policies()} ({why})")
        if policy.selection:  # the policy fixes how its tokens are chosen: its registered selector
            try:
                get_selector(policy.selection)
            except ValueError as e:
                raise _err("policy", self.policy, f"a policy whose selector is registered ({e})") from None
            object.__setattr__(self, "selection", policy.selection)
        object.__setattr__(self, "_policy", policy)
        object.__setattr__(self, "_select_params", self._build_select_params())

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, settings: Mapping[str, Any] | None) -> "SparseConfig":
        """Build from the plain dict stored under ``additional_config["vllm_sparse"]``."""
        if settings is None:
            return cls()
        if not isinstance(settings, Mapping):
            raise ValueError(
                f"additional_config[{CONFIG_KEY!r}] must be a JSON object (dict) of settings; got {settings!r}"
            )
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(allowed))
        if unknown:
            raise ValueError(f"unknown vllm_sparse setting(s) {unknown}; allowed keys: {allowed}")
        return cls(**settings)

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> "SparseConfig":
        """Read the ``"vllm_sparse"`` entry of vLLM's ``additional_config`` (defaults if absent)."""
        return cls.from_dict((additional_config or {}).get(CONFIG_KEY))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    # -- derived ----------------------------------------------------------------------
    @property
    def budget_policy(self) -> BudgetPolicy:
        return self._policy.budget  # type: ignore[attr-defined]

    @property
    def policy_object(self) -> Policy:
        """The selection policy built from ``policy`` and ``policy_args``."""
        return self._policy  # type: ignore[attr-defined]

    def eviction_rule(self, block_size: int | None = None) -> EvictionRule | None:
        """The blocks each request frees (``None`` without ``evict``), for KV blocks of ``block_size`` (default: ``page_size``)."""
        rule = self._evict_rule  # type: ignore[attr-defined]
        if rule is None or block_size in (None, rule.block_size):
            return rule
        return dataclasses.replace(rule, block_size=block_size)

    def _build_evict_rule(self) -> EvictionRule | None:
        if self.evict is None:
            return None
        args = dict(self.evict_args)
        if get_policy_class(self.evict).evicts_by_score:  # sinks | scored region | recent window
            keep = args.pop("keep", 1024)  # the rest are the policy's own (checked in _build_evict_policy)
            tail = max(self.local_window, self.page_size)
            floor = self.sink_tokens + tail + self.page_size
            if not _is_int(keep) or keep < floor:
                raise _err("evict_args.keep", keep, f"an integer >= sink_tokens + max(local_window, page_size) "
                           f"+ page_size = {floor} (sinks, the recent window and at least one region block)")
            region = -(-(keep - self.sink_tokens - tail) // self.page_size)
            return EvictionRule(self.page_size, self.sink_tokens, k=float(self.sink_tokens + tail), alpha=0.0,
                                min_keep=self.sink_tokens + tail, max_keep=self.sink_tokens + tail,
                                region_blocks=region)
        if "keep" in args:
            keep = args.pop("keep")
            if not _is_int(keep):
                raise _err("evict_args.keep", keep, "an integer number of tokens kept per request")
            spec = dict(k=float(keep), alpha=0.0, min_keep=keep, max_keep=keep)
        else:
            spec = dict(k=args.pop("k", self.k), alpha=args.pop("alpha", self.alpha),
                        min_keep=args.pop("min_keep", self.min_budget), max_keep=args.pop("max_keep", self.max_budget))
        if args:
            raise _err("evict_args", sorted(args), "keys among ['keep', 'k', 'alpha', 'min_keep', 'max_keep']")
        if not _is_real(spec["k"]) or spec["k"] <= 0 or not _is_real(spec["alpha"]) or not 0 <= spec["alpha"] < 1 + 1e-12:
            raise _err("evict_args", self.evict_args, "k > 0 and 0 < alpha <= 1 (or keep=N)")
        floor = self.sink_tokens + self.page_size
        if not _is_int(spec["min_keep"]) or spec["min_keep"] < floor:
            raise _err("evict_args.min_keep", spec["min_keep"],
                       f"an integer >= sink_tokens + page_size = {floor} (the sink block and one live block)")
        try:
            return EvictionRule(self.page_size, self.sink_tokens, **spec)
        except ValueError as e:
            raise ValueError(f"vllm_sparse setting evict={self.evict!r}: {e}") from None

    @property
    def evict_policy(self) -> Policy | None:
        """The eviction policy object (``evict``, with its own fields from ``evict_args``), or None."""
        return self._evict_policy  # type: ignore[attr-defined]

    def _build_evict_policy(self) -> Policy | None:
        if self.evict is None:
            return None
        cls = get_policy_class(self.evict)
        args = {k: v for k, v in self.evict_args.items() if k != "keep"} if cls.evicts_by_score else {}
        own = sorted({f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(Policy)})
        if set(args) - set(own):
            allowed = f"the policy's own arguments {own}" if own else "nothing else"
            raise _err("evict_args", sorted(args), f"'keep' and {allowed} for evict={self.evict!r}")
        try:
            return cls.from_settings(self.to_dict(), args)
        except ValueError as e:
            raise ValueError(f"vllm_sparse setting evict_args for evict={self.evict!r}: {e}") from None

    @property
    def select_params(self) -> SelectParams:
        """How sparse decode selects (:class:`~vllm_sparse.kernels.selectors.SelectParams`), built once:
        the selector resolved, the granularity, sinks, window and candidate factor. Its
        ``rescore_dims`` is the setting as given, 0 when left to the head size: the layers decode with
        :meth:`select_params_for` their head size."""
        return self._select_params  # type: ignore[attr-defined]

    def rescore_dims_for(self, head_size: int) -> int:
        """``rescore_dims`` for heads of ``head_size`` dims: the setting, or by default
        :data:`RESCORE_FRACTION` of the dims (12 of 64, 24 of 128, 48 of 256). A fixed count would
        shrink with wider heads: 12 of Gemma 3's 256 dims missed needles that 48 found (RESULTS)."""
        if self.rescore_dims is not None:
            return self.rescore_dims
        return max(1, int(head_size * RESCORE_FRACTION))

    def select_params_for(self, head_size: int) -> SelectParams:
        """:attr:`select_params` with ``rescore_dims`` resolved for heads of ``head_size`` dims."""
        return dataclasses.replace(self.select_params, rescore_dims=self.rescore_dims_for(head_size))

    def _build_select_params(self) -> SelectParams:
        params = SelectParams.create(self.selection, self.granularity, self.sink_tokens, self.local_window,
                                     self.candidate_factor, self.rescore_dims or 0)
        if params.selector.whole_pages:
            # whole-page selections (exact_pages, quest) always attend at least the current token, so the
            # page being written is always attended (as in Quest, whose selection keeps the last page: its
            # summary is still growing) and the compacted block tables end with that partial page
            params = dataclasses.replace(params, local_window=max(self.local_window, 1))
        return params

    def attended(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """Tokens each request attends at its current length, ``[B]`` int64 (dense below ``dense_below``)."""
        return self.budget_policy.attended(seq_lens, self.sink_tokens, self.local_window, self.dense_below)

    # -- validation -------------------------------------------------------------------
    def _validate(self) -> None:
        if not isinstance(self.policy, str):
            raise _err("policy", self.policy, f"one of {available_policies()}")
        get_policy_class(self.policy)  # unknown names: a ValueError listing the registered ones
        if not isinstance(self.policy_args, Mapping):
            raise _err("policy_args", self.policy_args, "a dict of the policy's arguments")
        if not _is_real(self.alpha) or not 0 < self.alpha <= 1:
            raise _err("alpha", self.alpha, "a number with 0 < alpha <= 1")
        if not _is_real(self.k) or self.k <= 0:
            raise _err("k", self.k, "a number > 0")
        for key in ("sink_tokens", "local_window", "dense_below", "dense_layers"):
            v = getattr(self, key)
            if not _is_int(v) or v < 0:
                raise _err(key, v, "an integer >= 0")
        floor = max(1, self.sink_tokens + self.local_window)
        if not _is_int(self.min_budget) or self.min_budget < floor:
            raise _err("min_budget", self.min_budget, f"an integer >= max(1, sink_tokens + local_window) = {floor}")
        if self.max_budget is not None and (not _is_int(self.max_budget) or self.max_budget < self.min_budget):
            raise _err("max_budget", self.max_budget, f"null or an integer >= min_budget ({self.min_budget})")
        ps = self.page_size
        if not _is_int(ps) or ps < 16 or ps & (ps - 1):
            raise _err("page_size", ps, "a power of two >= 16 (one page per KV block: it sets vLLM's block size)")
        if not _is_int(self.reselect_every) or self.reselect_every < 1:
            raise _err("reselect_every", self.reselect_every,
                       "an integer >= 1 (decode steps a request keeps its page selection; 1: select every step)")
        if self.reselect_similarity is None:
            pass  # the default: resolved in __post_init__
        elif not _is_real(self.reselect_similarity) or not 0.0 <= self.reselect_similarity <= 1.0:
            raise _err("reselect_similarity", self.reselect_similarity,
                       "a number in [0, 1] (cosine similarity a kept selection's query needs; 0: off) or null (default)")
        elif self.reselect_similarity > 0 and self.reselect_every == 1:
            raise _err("reselect_similarity", self.reselect_similarity,
                       "0 unless reselect_every > 1 (with 1 every step selects anyway)")
        rcf = self.reselect_candidate_factor
        if rcf is not None and (not _is_real(rcf) or rcf < 1):
            raise _err("reselect_candidate_factor", rcf,
                       "null (a row failing reselect_similarity selects afresh) or a number >= 1 "
                       "(candidate pages per budget page when it refreshes)")
        if not isinstance(self.force_sparse, bool):
            raise _err("force_sparse", self.force_sparse, "true or false")
        if self.evict is not None and self.evict not in evicting_policies():
            why = ""
            if self.evict in available_policies():
                why = f" ({self.evict!r} selects tokens but cannot free KV blocks yet)"
            raise _err("evict", self.evict, f"null (keep every token) or one of {evicting_policies()}{why}")
        if not isinstance(self.evict_args, Mapping):
            raise _err("evict_args", self.evict_args, "a dict of the eviction rule's arguments")
        available_policies()  # third-party policy modules may register their selectors on import
        if not isinstance(self.selection, str) or self.selection not in available_selectors():
            raise _err("selection", self.selection, f"one of {available_selectors()} (registered selectors)")
        if self.granularity not in GRANULARITIES:
            raise _err("granularity", self.granularity, f"one of {list(GRANULARITIES)}")
        if self.rescore_dims is not None and (not _is_int(self.rescore_dims) or self.rescore_dims < 0):
            raise _err("rescore_dims", self.rescore_dims,
                       "an integer >= 0 (0: every dim of the head), or null (3/16 of the head's dims)")
        if not _is_real(self.candidate_factor) or self.candidate_factor < 1:
            raise _err("candidate_factor", self.candidate_factor, "a number >= 1")
