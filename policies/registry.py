"""One registry of policies by name: the built-ins and any installed third-party package.

Third-party packages add policies through the ``vllm_sparse.policies`` entry-point group
(``my_policy = "my_pkg.module:MyPolicy"``, see ``examples/third_party_policy/``) or by calling
:func:`register_policy`. Names are unique; an entry point whose class has another ``name`` is
an error. The old budget names ``n_alpha`` and ``fixed_k`` are aliases of ``ntopk`` and ``topk``.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from .dense import Dense
from .h2o import H2O
from .knorm import KNorm
from .ntopk import NTopK
from .policy import Policy
from .quest import Quest
from .snapkv import SnapKV
from .streaming import Streaming
from .topk import TopK
from .tova import TOVA

__all__ = ["register_policy", "available_policies", "get_policy_class", "BUILTIN", "ALIASES"]

BUILTIN = (Dense, NTopK, TopK, Quest, Streaming, SnapKV, H2O, TOVA, KNorm)
ALIASES = {"n_alpha": "ntopk", "fixed_k": "topk"}

_REGISTRY: dict[str, type[Policy]] = {}
_ENTRY_POINTS_LOADED = False


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Register a :class:`~.policy.Policy` subclass under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Policy)) or not cls.name:
        raise TypeError(f"{cls!r} must be a vllm_sparse.policies.Policy subclass with a non-empty `name`")
    if cls.name in ALIASES:
        raise ValueError(f"policy name {cls.name!r} is reserved (alias of {ALIASES[cls.name]!r})")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in BUILTIN:
    register_policy(_cls)


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group="vllm_sparse.policies"):
        cls = ep.load()
        if getattr(cls, "name", None) != ep.name:
            raise ValueError(f"entry point {ep.name!r} ({ep.value}) loads a policy named "
                             f"{getattr(cls, 'name', None)!r}; the names must match")
        register_policy(cls)


def reload_entry_points() -> None:
    """Read the entry points again (after installing a package into a running process)."""
    global _ENTRY_POINTS_LOADED
    _ENTRY_POINTS_LOADED = False
    _load_entry_points()


def available_policies() -> list[str]:
    """Every registered name: built-in and installed third-party (aliases not listed)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_policy_class(name: str) -> type[Policy]:
    _load_entry_points()
    try:
        return _REGISTRY[ALIASES.get(name, name)]
    except KeyError:
        raise ValueError(f"vllm_sparse policy={name!r}; allowed: {available_policies()}") from None
