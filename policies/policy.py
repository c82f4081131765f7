"""The policy interface: which KV tokens each (request, KV head) keeps, composed of a scorer, a
budget, an optional allocator and a schedule. Never imports vLLM.

Shaped after kvpress (NVIDIA/kvpress), which separates the *scorer* of a press from its
compression ratio and its wrappers:

* **scorer** — :meth:`Policy.score`: a float per (KV head, token), higher = keep; a pure-torch
  reference over one request (:class:`TokenState`), the oracle of any kernel;
* **budget** — a :class:`~.base.BudgetPolicy` (``n_alpha``: k·n^α, ``fixed_k``, ``dense``): how
  many tokens each head keeps at length ``n``, sinks and window included;
* **allocator** (optional) — redistributes a layer's total budget across its KV heads with the
  total unchanged (:class:`AdaKVAllocator`, after Ada-KV);
* **schedule** — when the policy runs: ``"step"`` (every decode step), ``"prefill_end"`` (once,
  when the prompt is done, as SnapKV), or ``"every:N"``.

The first ``sink_tokens`` and the last ``local_window`` tokens are always kept (forced). A policy is
a frozen dataclass of its settings, one file each (``policies/<name>.py``), registered by name in
:mod:`.registry`.

What runs inside vLLM is the policy's own code:

* **decode selection** — a policy that sets ``pages_by_score`` is served by a selector built from
  its :meth:`Policy.score` (:mod:`.score_pages`): the whole pages whose best token scores highest;
* **eviction** — a policy that evicts by score (``evicts_by_score``) has :meth:`Policy.score` rank
  the tokens of the blocks leaving the recent window against the kept region's. Per-request state
  (H2O's accumulated attention, TOVA's latest attention, SnapKV's votes) is one float32 per (token,
  KV head) that the workers keep in the request's own KV blocks — never on the policy object, so
  it is freed and preempted with them. The policy says it keeps one (``keeps_token_state``), what a
  new token starts with (``new_token_state``) and how a step changes it (:meth:`Policy.update_state`);
  :meth:`Policy.score` reads it back as :attr:`TokenState.stored`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from .base import BudgetPolicy, FixedKPolicy, NAlphaPolicy
from .budget import attended_tokens
from .state import AttentionStep, TokenState

__all__ = ["TokenState", "AttentionStep", "Policy", "AdaKVAllocator", "SCHEDULES"]

SCHEDULES = ("step", "prefill_end")  # or "every:N"


@dataclasses.dataclass(frozen=True)
class AdaKVAllocator:
    """Ada-KV's budget allocation (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive
    Budget Allocation", 2024): the layer's total budget goes to the highest scores *across* its
    heads, so heads whose attention is concentrated give slots to heads whose attention is spread.
    Scores are normalized per head (each head's non-forced scores divided by their sum) so heads
    compete on shares; every head keeps its forced tokens plus at least ``floor`` of its budget."""

    floor: float = 0.2

    def counts(self, scores: torch.Tensor, forced: torch.Tensor, count: int) -> torch.Tensor:
        """``[H]`` tokens per head (forced included), summing to ``H * count`` (or all tokens)."""
        h, n = scores.shape
        n_forced = forced.sum(1)
        free = (count - n_forced).clamp_min(0)  # per head, equal split
        base = torch.minimum(torch.ceil(free.double() * self.floor).long(), free)
        pool = int((free - base).sum())
        s = scores.clamp_min(0).masked_fill(forced, 0)
        s = s / s.sum(1, keepdim=True).clamp_min(1e-30)
        # each head's top `base` are taken; the pool goes to the best remaining shares of any head
        ranked = s.sort(dim=1, descending=True).values
        cols = torch.arange(n)[None, :]
        rest = ranked.masked_fill(cols < base[:, None], -1.0).masked_fill(cols >= (n - n_forced)[:, None], -1.0)
        extra = torch.zeros(h, dtype=torch.long)
        if pool > 0:
            top = rest.flatten().topk(min(pool, rest.numel())).indices
            extra = torch.bincount(top // n, minlength=h)
        return n_forced + base + extra


@dataclasses.dataclass(frozen=True)
class Policy:
    """Base class: a frozen dataclass of the policy's settings; subclasses set ``name`` and
    implement :meth:`score` (or override :meth:`keep`).

    Class attributes:
        name: registry name.
        schedule: ``"step"``, ``"prefill_end"`` or ``"every:N"``.
        selection: the registered selector (``vllm_sparse.kernels.selectors``) that runs this
            policy inside vLLM (``None``: the configured ``selection``, for policies scored by
            ``q·k``; see ``vllm_sparse.config``), or ``""`` (the default) when the policy has no
            vLLM decode path (reference only). ``pages_by_score`` sets it to the policy's name.
        pages_by_score: inside vLLM, decode attends the whole pages whose best token scores highest
            by :meth:`score` (with the policy's default settings), as many as Quest's rule gives the
            budget: a selector named after the policy is built from :meth:`score` and registered
            with it (:mod:`.score_pages`). :meth:`score` may read ``keys``, ``query``, ``scale``
            and ``page_size`` only.
        frees_blocks: ``evict=<name>`` really returns KV blocks to vLLM's pool.
        evicts_by_score: with ``evict``, the workers keep the best-scored tokens (by :meth:`score`
            on the keys and :attr:`TokenState.stored`) in a fixed kept region and free the rest
            (``False``: by position).
        keeps_token_state: with ``evict``, the workers keep one float32 per (token, KV head) for
            this policy in the request's KV blocks, start each new token at ``new_token_state``,
            change it every step by :meth:`update_state` and pass it to :meth:`score` as
            :attr:`TokenState.stored`.
        new_token_state: the state a newly written token starts with (``inf``: kept until the
            state says otherwise).
        needs: the :class:`TokenState` fields :meth:`score` reads.
    """

    name: ClassVar[str] = ""
    schedule: ClassVar[str] = "step"
    selection: ClassVar[str | None] = ""
    pages_by_score: ClassVar[bool] = False
    frees_blocks: ClassVar[bool] = False
    evicts_by_score: ClassVar[bool] = False
    keeps_token_state: ClassVar[bool] = False
    new_token_state: ClassVar[float] = 0.0
    needs: ClassVar[tuple[str, ...]] = ()

    budget: BudgetPolicy = dataclasses.field(default_factory=NAlphaPolicy)
    sink_tokens: int = 4
    local_window: int = 64
    allocator: AdaKVAllocator | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.pages_by_score and "selection" not in vars(cls):  # its own score-built selector
            cls.selection = cls.name

    # -- the scorer -------------------------------------------------------------------
    def score(self, state: TokenState) -> torch.Tensor:
        """``[H, n]`` float: higher is kept first (forced tokens are kept regardless)."""
        raise NotImplementedError

    # -- per-token eviction state (keeps_token_state) ---------------------------------
    def update_state(self, stored: torch.Tensor | None, step: AttentionStep) -> torch.Tensor | None:
        """The per-token state after one forward step (only for ``keeps_token_state``).

        Args:
            stored: ``[R, H, N]`` float32 each resident token's state before the step (the step's
                own tokens hold ``new_token_state``; columns past a request's length hold
                anything), or ``None`` in a reference call without earlier steps.
            step: the step's queries and the requests' resident keys (:class:`AttentionStep`).
        Returns:
            ``[R, H, N]`` the state after the step (columns past a request's length are ignored),
            or ``None`` to leave it unchanged.
        """
        raise NotImplementedError(f"policy {self.name!r} keeps no per-token state")

    # -- what is kept -----------------------------------------------------------------
    def count(self, n: int) -> int:
        """Tokens each head keeps at length ``n`` (sinks and window included, at most ``n``)."""
        return int(attended_tokens(n, int(self.budget.budget(torch.tensor([n]))[0]), self.sink_tokens,
                                   self.local_window))

    def forced(self, n: int, num_kv_heads: int) -> torch.Tensor:
        """``[H, n]`` bool: the sinks and the local window."""
        pos = torch.arange(n)
        f = (pos < self.sink_tokens) | (pos >= n - self.local_window)
        return f[None, :].expand(num_kv_heads, n)

    def keep(self, state: TokenState) -> torch.Tensor:
        """``[H, n]`` bool: the tokens each KV head keeps (the reference rule every kernel matches).

        Forced tokens first, then the best scores up to :meth:`count` per head (or the
        allocator's per-head counts); ties go to the earlier token."""
        n, h = state.n, state.num_kv_heads
        for f in self.needs:
            state.require(self.name, f)
        forced = self.forced(n, h)
        count = self.count(n)
        if count >= n:
            return torch.ones(h, n, dtype=torch.bool)
        scores = self.score(state).float()
        counts = (self.allocator.counts(scores, forced, count) if self.allocator is not None
                  else torch.full((h,), count, dtype=torch.long))
        ranked = scores.masked_fill(forced, float("inf"))
        # stable: equal scores keep the earlier token
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(n).expand(h, n).contiguous())
        return rank < counts[:, None]

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: dict[str, Any], policy_args: dict[str, Any]) -> "Policy":
        """Build from the config's top-level settings (budget keys, sinks, window) plus ``policy_args``.

        ``policy_args`` may hold the policy's own fields, ``budget_tokens`` (a fixed budget instead
        of k·n^α) and ``allocator: "adakv"``; anything else is a ``ValueError`` naming it."""
        args = dict(policy_args)
        own = {f.name for f in dataclasses.fields(cls)} - {"budget", "sink_tokens", "local_window", "allocator"}
        allowed = sorted(own | {"budget_tokens", "allocator"})
        unknown = sorted(set(args) - set(allowed))
        if unknown:
            raise ValueError(f"vllm_sparse policy_args {unknown} not understood by policy {cls.name!r}; "
                             f"allowed: {allowed}")
        if "budget_tokens" in args:
            budget = FixedKPolicy(budget_tokens=args.pop("budget_tokens"))
        else:
            budget = cls.default_budget(settings)
        allocator = args.pop("allocator", None)
        if allocator not in (None, "adakv"):
            raise ValueError(f"vllm_sparse policy_args.allocator={allocator!r}; allowed: null, 'adakv'")
        return cls(budget=budget, sink_tokens=settings.get("sink_tokens", 4),
                   local_window=settings.get("local_window", 64),
                   allocator=AdaKVAllocator() if allocator == "adakv" else None, **args)

    @classmethod
    def default_budget(cls, settings: dict[str, Any]) -> BudgetPolicy:
        return NAlphaPolicy(**{k: settings[k] for k in ("k", "alpha", "min_budget", "max_budget") if k in settings})

    def __post_init__(self) -> None:
        sched = self.schedule
        if sched not in SCHEDULES and not (sched.startswith("every:") and sched[6:].isdigit() and int(sched[6:]) > 0):
            raise ValueError(f"policy {self.name!r} schedule={sched!r}; allowed: {SCHEDULES} or 'every:N'")
