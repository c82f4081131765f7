"""SparseConfig: defaults, construction from vLLM's additional_config, and one named error per bad value."""

import subprocess
import sys

import pytest
import torch

from vllm_sparse.config import SparseConfig
from vllm_sparse.policies import BudgetPolicy, FixedKPolicy, NAlphaPolicy, available_policies, register_policy


def test_defaults_are_valid_and_consistent():
    cfg = SparseConfig()
    assert cfg.min_budget >= cfg.sink_tokens + cfg.local_window
    assert isinstance(cfg.budget_policy, NAlphaPolicy)
    assert cfg.budget_policy.k == cfg.k and cfg.budget_policy.alpha == cfg.alpha


def test_reselect_similarity_follows_reselect_every_unless_set():
    """The default reuse gate (reselect_every 16, similarity 0.8) switches off with reselect_every 1;
    set explicitly, the similarity is kept, and the resolved settings round-trip."""
    assert (SparseConfig().reselect_every, SparseConfig().reselect_similarity) == (16, 0.8)
    assert SparseConfig().reselect_candidate_factor == 4.0
    assert SparseConfig(reselect_every=1).reselect_similarity == 0.0
    assert SparseConfig(reselect_every=2, reselect_similarity=0.0).reselect_similarity == 0.0
    assert SparseConfig(reselect_every=8, reselect_similarity=0.9).reselect_similarity == 0.9
    for cfg in (SparseConfig(), SparseConfig(reselect_every=1)):
        assert SparseConfig.from_dict(cfg.to_dict()) == cfg


def test_from_additional_config():
    cfg = SparseConfig.from_additional_config({"vllm_sparse": {"alpha": 0.7, "k": 2, "policy": "fixed_k",
                                                               "policy_args": {"budget_tokens": 300}}})
    assert cfg.alpha == 0.7 and cfg.k == 2
    assert isinstance(cfg.budget_policy, FixedKPolicy) and cfg.budget_policy.budget_tokens == 300
    assert SparseConfig.from_additional_config(None) == SparseConfig()
    assert SparseConfig.from_additional_config({"other_plugin": 1}) == SparseConfig()
    assert SparseConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"alpha": 0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.2}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": "0.5"}, "alpha"),
        ({"k": 0}, "k"),
        ({"k": -1}, "k"),
        ({"k": float("inf")}, "k"),
        ({"k": True}, "k"),
        ({"min_budget": 10}, "min_budget"),  # below sink_tokens + local_window = 68
        ({"min_budget": 200.0}, "min_budget"),
        ({"max_budget": 100}, "max_budget"),  # below min_budget
        ({"sink_tokens": -1}, "sink_tokens"),
        ({"local_window": 1.5}, "local_window"),
        ({"dense_below": -5}, "dense_below"),
        ({"page_size": 12}, "page_size"),
        ({"page_size": 0}, "page_size"),
        ({"page_size": 8}, "page_size"),  # pages are KV blocks: >= 16
        ({"dense_layers": -1}, "dense_layers"),
        ({"reselect_every": 0}, "reselect_every"),
        ({"reselect_every": 2.0}, "reselect_every"),
        ({"reselect_every": 2, "reselect_similarity": 1.5}, "reselect_similarity"),
        ({"reselect_every": 2, "reselect_similarity": "high"}, "reselect_similarity"),
        ({"reselect_every": 1, "reselect_similarity": 0.9}, "reselect_similarity"),
        ({"reselect_candidate_factor": 0.5}, "reselect_candidate_factor"),
        ({"reselect_candidate_factor": "fast"}, "reselect_candidate_factor"),
        ({"force_sparse": "yes"}, "force_sparse"),
        ({"selection": "pages"}, "selection"),
        ({"granularity": "layer"}, "granularity"),
        ({"candidate_factor": 0.5}, "candidate_factor"),
        ({"policy": "nope"}, "policy"),
        ({"policy_args": [1]}, "policy_args"),
    ],
)
def test_bad_value_names_key_value_and_allowed(settings, key):
    with pytest.raises(ValueError) as e:
        SparseConfig.from_dict(settings)
    msg = str(e.value)
    assert f"{key}=" in msg and repr(settings[key]) in msg and "allowed" in msg


def test_unknown_key_is_named_with_the_allowed_keys():
    with pytest.raises(ValueError, match=r"unknown vllm_sparse setting\(s\) \['alpah'\].*allowed keys.*'alpha'"):
        SparseConfig.from_dict({"alpah": 0.5})


def test_policy_args_are_validated_by_the_policy():
    with pytest.raises(ValueError, match=r"policy_args \['budget'\] not understood by policy 'topk'.*budget_tokens"):
        SparseConfig.from_dict({"policy": "fixed_k", "policy_args": {"budget": 5}})
    with pytest.raises(ValueError, match=r"policy_args \['x'\].*'ntopk'; allowed: \['allocator', 'budget_tokens'\]"):
        SparseConfig.from_dict({"policy_args": {"x": 1}})
    with pytest.raises(ValueError, match=r"budget_tokens=0"):
        SparseConfig.from_dict({"policy": "fixed_k", "policy_args": {"budget_tokens": 0}})


def test_not_a_dict():
    with pytest.raises(ValueError, match="must be a JSON object"):
        SparseConfig.from_dict("alpha=0.5")


def test_config_is_frozen():
    cfg = SparseConfig()
    with pytest.raises(Exception):
        cfg.alpha = 0.9  # type: ignore[misc]


def test_attended_dense_below_and_policies():
    n = torch.tensor([1, 100, 1023, 1024, 4096, 100_000])
    cfg = SparseConfig()  # k=12, alpha=0.5, min 128, dense below 1024
    att = cfg.attended(n)
    assert att[:3].tolist() == [1, 100, 1023]  # dense below the threshold
    assert att[3] == 384 and att[4] == 768 and att[5] == 3795  # ceil(12 * sqrt(n))
    dense = SparseConfig(policy="dense").attended(n)
    assert torch.equal(dense, n)
    fixed = SparseConfig(policy="fixed_k", policy_args={"budget_tokens": 300}, dense_below=0).attended(n)
    assert fixed.tolist() == [1, 100, 300, 300, 300, 300]


def test_third_party_policy_registers_and_validates():
    import dataclasses
    from typing import ClassVar

    from vllm_sparse.policies.ntopk import NTopK

    @dataclasses.dataclass(frozen=True)
    class HalfBudget(BudgetPolicy):
        fraction: float = 0.5

        def budget(self, seq_lens):
            return (seq_lens * self.fraction).ceil().long()

    @register_policy
    @dataclasses.dataclass(frozen=True)
    class HalfPolicy(NTopK):
        name: ClassVar[str] = "half_for_test"
        fraction: float = 0.5

        def __post_init__(self):
            super().__post_init__()
            object.__setattr__(self, "budget", HalfBudget(self.fraction))

    cfg = SparseConfig(policy="half_for_test", policy_args={"fraction": 0.25}, dense_below=0, min_budget=68)
    assert cfg.attended(torch.tensor([4000])).item() == 1000
    assert "half_for_test" in available_policies()
    with pytest.raises(ValueError, match=r"policy_args \['nope'\].*half_for_test.*fraction"):
        SparseConfig(policy="half_for_test", policy_args={"nope": 1})
    with pytest.raises(TypeError):
        register_policy(int)


def test_reference_only_and_non_evicting_policies_are_refused_by_name():
    with pytest.raises(ValueError, match=r"policy='h2o'.*decode path in vLLM.*ntopk"):
        SparseConfig(policy="h2o")
    with pytest.raises(ValueError, match=r"evict='quest'.*streaming.*cannot free KV blocks"):
        SparseConfig(evict="quest")
    assert SparseConfig(policy="quest").selection == "quest"
    assert SparseConfig(policy="streaming").selection == "recent"
    assert SparseConfig(policy="n_alpha").policy_object.name == "ntopk"  # the old names still work


def test_policies_name_registered_selectors():
    """A policy runs in vLLM through the selector it names; a policy without one, or naming an
    unregistered one, is refused at start-up by name. `selection` takes registered names only."""
    import dataclasses
    from typing import ClassVar

    from vllm_sparse.policies import Policy, registry

    @dataclasses.dataclass(frozen=True)
    class ScorerOnly(Policy):
        name: ClassVar[str] = "scorer_only_for_test"

    @dataclasses.dataclass(frozen=True)
    class Misnamed(Policy):
        name: ClassVar[str] = "misnamed_for_test"
        selection: ClassVar[str | None] = "no_such_selector"

    register_policy(ScorerOnly)
    register_policy(Misnamed)
    try:
        with pytest.raises(ValueError, match=r"policy='scorer_only_for_test'.*reference scorer"):
            SparseConfig(policy="scorer_only_for_test")
        with pytest.raises(ValueError, match=r"policy='misnamed_for_test'.*selection='no_such_selector'; allowed"):
            SparseConfig(policy="misnamed_for_test")
    finally:
        registry._REGISTRY.unregister("scorer_only_for_test")
        registry._REGISTRY.unregister("misnamed_for_test")
    with pytest.raises(ValueError, match=r"selection='block' is invalid; allowed: one of \[.*'dense'.*'exact_pages'"):
        SparseConfig(selection="block")
    assert SparseConfig(policy="dense").selection == "dense"


def test_importing_the_package_does_not_import_vllm():
    code = (
        "import sys, vllm_sparse, vllm_sparse.config, vllm_sparse.kernels, vllm_sparse.kernels.reference, "
        "vllm_sparse.policies; assert 'vllm' not in sys.modules, 'vllm imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_knorm_eviction_settings():
    rule = SparseConfig(evict="knorm", evict_args={"keep": 512}).eviction_rule()
    # sinks (4) + window max(64, 32) = 68 in the sink block and tail; (512 - 68) / 32 → 14 region blocks
    assert rule.region_blocks == 14 and rule.keep(10_000) == 68
    with pytest.raises(ValueError, match=r"evict_args.keep=50.*= 100"):
        SparseConfig(evict="knorm", evict_args={"keep": 50})
    with pytest.raises(ValueError, match=r"evict_args.*'keep' and nothing else"):
        SparseConfig(evict="knorm", evict_args={"k": 2})


def test_snapkv_eviction_settings():
    cfg = SparseConfig(evict="snapkv", evict_args={"keep": 512, "window": 16, "kernel": 5})
    assert cfg.eviction_rule().region_blocks == 14
    assert (cfg.evict_policy.window, cfg.evict_policy.kernel) == (16, 5)
    assert SparseConfig(evict="snapkv").evict_policy.window == 32  # SnapKV's own default
    with pytest.raises(ValueError, match=r"evict_args.*'keep' and the policy's own arguments \['kernel', 'window'\]"):
        SparseConfig(evict="snapkv", evict_args={"windw": 8})
    with pytest.raises(ValueError, match=r"evict='snapkv'.*kernel=4.*odd"):
        SparseConfig(evict="snapkv", evict_args={"kernel": 4})
    with pytest.raises(ValueError, match=r"policy='snapkv'.*use evict='snapkv'"):
        SparseConfig(policy="snapkv")


def test_rescore_dims_default_scales_with_the_head():
    """Unset, ``rescore_dims`` is 3/16 of the head's dims (12 of 64, where it was tuned); a value is kept."""
    cfg = SparseConfig.from_dict({})
    assert cfg.rescore_dims is None and cfg.select_params.rescore_dims == 0
    assert [cfg.select_params_for(d).rescore_dims for d in (64, 128, 256)] == [12, 24, 48]
    assert SparseConfig.from_dict({"rescore_dims": 16}).select_params_for(256).rescore_dims == 16
    assert SparseConfig.from_dict({"rescore_dims": 0}).select_params_for(64).rescore_dims == 0
    with pytest.raises(ValueError, match=r"rescore_dims=-1.*null"):
        SparseConfig.from_dict({"rescore_dims": -1})
