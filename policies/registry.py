"""One registry of policies by name: the built-ins and any installed third-party package.

Third-party packages add policies through the ``vllm_sparse.policies`` entry-point group
(``my_policy = "my_pkg.module:MyPolicy"``, see ``examples/third_party_policy/``) or by calling
:func:`register_policy`. Names are unique; an entry point whose class has another ``name`` is
an error. The old budget names ``n_alpha`` and ``fixed_k`` are aliases of ``ntopk`` and ``topk``.
The entry points are read by the plugin's one loader, :class:`vllm_sparse.kernels.registry.Registry`,
which serves the selectors too. A policy with ``pages_by_score`` brings its decode selector, built
from its score (:mod:`.score_pages`), registered with it.
"""

from __future__ import annotations

from vllm_sparse.kernels.registry import Registry
from vllm_sparse.kernels.selectors import available_selectors, get_selector, register_selector

from .dense import Dense
from .h2o import H2O
from .knorm import KNorm
from .ntopk import NTopK
from .policy import Policy
from .quest import Quest
from .score_pages import ScorePages, score_pages_selector
from .snapkv import SnapKV
from .streaming import Streaming
from .topk import TopK
from .tova import TOVA

__all__ = ["register_policy", "available_policies", "get_policy_class", "reload_entry_points", "BUILTIN", "ALIASES"]

BUILTIN = (Dense, NTopK, TopK, Quest, Streaming, SnapKV, H2O, TOVA, KNorm)
ALIASES = {"n_alpha": "ntopk", "fixed_k": "topk"}

#: what :meth:`Policy.score` may read when it ranks decode pages (a decode step has no other state)
_DECODE_FIELDS = {"keys", "query", "scale", "page_size"}


def _check(cls: type[Policy]) -> None:
    """What a policy class promises, checked before it is registered."""
    if cls.name in ALIASES:
        raise ValueError(f"policy name {cls.name!r} is reserved (alias of {ALIASES[cls.name]!r})")
    if cls.keeps_token_state and cls.update_state is Policy.update_state:
        raise TypeError(f"policy {cls.name!r} sets keeps_token_state but does not implement update_state")
    if cls.pages_by_score:
        if set(cls.needs) - _DECODE_FIELDS:
            raise TypeError(f"policy {cls.name!r} sets pages_by_score but its score needs {list(cls.needs)}; "
                            f"a decode step gives {sorted(_DECODE_FIELDS)}")
        if cls.selection in available_selectors() and not isinstance(get_selector(cls.selection), ScorePages):
            raise TypeError(f"policy {cls.name!r} sets pages_by_score, but selector {cls.selection!r} is "
                            "registered already")


def _admit(cls: type[Policy]) -> type[Policy]:
    """The stored entry is the class; a ``pages_by_score`` policy registers its selector with it."""
    if cls.pages_by_score:
        register_selector(score_pages_selector(cls))
    return cls


_REGISTRY: Registry[type[Policy]] = Registry("vllm_sparse.policies", Policy, "policy", "policy",
                                             make=_admit, check=_check)


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Register a :class:`~.policy.Policy` subclass under ``cls.name`` (usable as a decorator)."""
    return _REGISTRY.register(cls)


for _cls in BUILTIN:
    register_policy(_cls)


def reload_entry_points() -> None:
    """Read the entry points again (after installing a package into a running process)."""
    _REGISTRY.load_entry_points(reload=True)


def available_policies() -> list[str]:
    """Every registered name: built-in and installed third-party (aliases not listed)."""
    return _REGISTRY.names()


def get_policy_class(name: str) -> type[Policy]:
    """The registered class called ``name`` (or an alias); ``ValueError`` naming the allowed names otherwise."""
    return _REGISTRY.get(ALIASES.get(name, name))
