"""Offline batch generation with sparse attention: needle-in-a-haystack, sparse vs dense side by side.

    python examples/offline_needles.py                       # SmolLM2, 12 needles at 1k-7k tokens
    python examples/offline_needles.py --sparse '{"alpha": 0.4, "k": 4}'

Hides "The special magic number for <word> is <number>." at depths 10/50/90% of Paul Graham
essays cut to 1k/2k/4k/7k tokens, asks for it back, and prints what vLLM's stock (dense)
backend and the sparse backend answer, one row per prompt.
"""

import argparse
import gc
import json
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # CPU build only; ignored on GPUs

from vllm import LLM, SamplingParams

from vllm_sparse.assets import data
from vllm_sparse.assets.models import prepare_model
from vllm_sparse.cpu_tuning import model_dtype


def answers(model, prompts, **llm_kwargs):
    llm = LLM(model=model, max_model_len=8192, enforce_eager=True, **llm_kwargs)
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0))
    texts = [o.outputs[0].text for o in outs]
    del llm
    gc.collect()
    return texts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model directory (default: SmolLM2-135M-Instruct, built offline)")
    ap.add_argument("--sparse", default="{}", help="vllm_sparse settings as JSON (default: the documented defaults)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 7000], help="context lengths")
    # bf16 on a GPU or a CPU with bf16 arithmetic; float32 on an AVX2-only CPU, where bf16 is ~100x slower
    ap.add_argument("--dtype", default=model_dtype(), help="model dtype (default here: %(default)s)")
    args = ap.parse_args()
    model = args.model or str(prepare_model("smollm2"))

    from transformers import AutoTokenizer

    cases = data.needle_prompts(AutoTokenizer.from_pretrained(model), lengths=tuple(args.lengths))
    prompts = [c.prompt for c in cases]
    dense = answers(model, prompts, dtype=args.dtype)
    sparse = answers(model, prompts, dtype=args.dtype, attention_backend="CUSTOM",
                     additional_config={"vllm_sparse": json.loads(args.sparse)})

    print(f"\n{'tokens':>7} {'depth':>5}  {'answer':<14} {'dense':<24} {'sparse':<24}")
    for c, d, s in zip(cases, dense, sparse):
        mark = lambda t: ("ok  " if data.retrieved(c, t) else "MISS") + " " + t.strip()[:18]
        print(f"{c.context_tokens:>7} {c.depth:>5.0%}  {c.answer:<14} {mark(d):<24} {mark(s):<24}")
    n = len(cases)
    print(f"\nretrieved: dense {data.score(cases, dense)[0]}/{n}, sparse {data.score(cases, sparse)[0]}/{n}")


if __name__ == "__main__":
    main()
