"""Offline batch generation on Ray Data with the sparse attention backend.

    python examples/ray_batch.py --model PATH_OR_NAME --input prompts.jsonl --output completions.jsonl
    python examples/ray_batch.py --model ... --input ... --output ... --sparse '{"alpha": 0.4, "k": 4}'

Each input line is a JSON object with a ``"prompt"`` string; every other field (``"id"``, …) is
carried to the output line unchanged, which adds ``"completion"`` (the generated text),
``"prompt_tokens"`` and ``"completion_tokens"``. Output lines come in input order. Sampling is
greedy unless ``--temperature`` says otherwise.

Ray Data runs ``--concurrency`` vLLM engines (one actor each, attention backend ``CUSTOM``,
settings from ``--sparse`` as ``additional_config={"vllm_sparse": ...}``) and streams batches of
``--batch-size`` prompts through them; vLLM itself tokenizes and detokenizes, exactly as
``LLM.generate`` does. The settings are checked here, before Ray starts: a bad one stops the
script with the same ``ValueError`` the engine would raise.

CPU machines (vLLM's CPU build): each engine reserves one Ray CPU and uses vLLM's ``mp``
executor (Ray's vLLM executor does not run on the CPU platform), and its KV cache is
``--kv-cache-space-gib`` (``VLLM_CPU_KVCACHE_SPACE``; without it each engine asks for most of
the machine's memory). Without ``--address`` the script starts a private local Ray instance;
``--address auto`` joins a running cluster (``ray start``) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vllm_sparse.config import SparseConfig


def read_records(path: Path) -> list[dict]:
    """The input JSONL as dicts; stops with the line number of the first bad line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"error: {path}:{n}: not JSON ({e})")
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                sys.exit(f'error: {path}:{n}: each line must be a JSON object with a "prompt" string')
            records.append(rec)
    if not records:
        sys.exit(f"error: {path} holds no prompts")
    return records


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory or hub name")
    ap.add_argument("--input", required=True, type=Path, help='JSONL, one {"prompt": ...} per line')
    ap.add_argument("--output", required=True, type=Path, help="JSONL written in input order")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    ap.add_argument("--sparse", default="{}", help="vllm_sparse settings as JSON (default: the documented defaults)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per Ray Data batch (default 16)")
    ap.add_argument("--concurrency", type=int, default=1, help="vLLM engines (Ray actors) (default 1)")
    ap.add_argument("--max-model-len", type=int, default=8192, help="engine context limit (default 8192)")
    ap.add_argument("--dtype", default="auto", help="model dtype: auto, bfloat16, float16, float32 (default auto)")
    ap.add_argument("--kv-cache-space-gib", type=int, default=2,
                    help="CPU build: KV cache per engine in GiB, VLLM_CPU_KVCACHE_SPACE (default 2)")
    ap.add_argument("--address", default=None,
                    help="Ray cluster to join (e.g. auto); default: start a local Ray instance")
    ap.add_argument("--num-cpus", type=int, default=None,
                    help="CPUs of the local Ray instance (default: this machine's, at least concurrency + 1)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)

    # Fail fast, before Ray or vLLM start: bad JSON, a bad setting, a bad input file.
    try:
        settings = json.loads(args.sparse)
        SparseConfig.from_dict(settings)  # the check the engine runs: ValueError naming the setting
    except json.JSONDecodeError as e:
        sys.exit(f"error: --sparse is not JSON: {e}")
    except ValueError as e:
        sys.exit(f"error: {e}")
    records = read_records(args.input)

    import ray
    import torch
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    cpu = not torch.cuda.is_available()  # vLLM's CPU build
    if args.address is None:
        # A private local instance. Each engine reserves 1 CPU; the light pre/postprocess tasks
        # need one more, so small machines get a logical CPU or two beyond their cores.
        num_cpus = args.num_cpus or max(os.cpu_count() or 1, args.concurrency + 1)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    else:
        ray.init(address=args.address)

    engine_kwargs = dict(
        attention_backend="CUSTOM",
        additional_config={"vllm_sparse": settings},
        enforce_eager=True,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
    )
    placement = None
    env_vars = {}
    if cpu:
        # Ray's default executor for TP > 1 is "ray", which refuses the CPU platform; "mp" works.
        engine_kwargs["distributed_executor_backend"] = "mp"
        placement = {"bundles": [{"CPU": 1}]}  # one CPU bundle per engine, no GPU
        env_vars["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_space_gib)
    config = vLLMEngineProcessorConfig(
        model_source=args.model,
        engine_kwargs=engine_kwargs,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        placement_group_config=placement,
        runtime_env={"env_vars": env_vars} if env_vars else None,
        # plain prompts: no chat template; vLLM tokenizes and detokenizes as LLM.generate does
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        log_engine_metrics=False,
    )
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature)

    def preprocess(row):
        # each row carries its input line verbatim (any fields, any types) and its line index
        return dict(prompt=json.loads(row["record"])["prompt"], sampling_params=sampling)

    def postprocess(row):
        out = json.loads(row["record"])
        out.update(completion=row["generated_text"], prompt_tokens=int(row["num_input_tokens"]),
                   completion_tokens=int(row["num_generated_tokens"]))
        return dict(index=row["index"], line=json.dumps(out, ensure_ascii=False))

    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    items = [dict(index=i, record=json.dumps(r)) for i, r in enumerate(records)]
    # about one block per batch (from_items' default splits small inputs into a block per row)
    ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // args.batch_size))
    rows = processor(ds).take_all()  # Ray Data shows its progress bars while this runs
    rows.sort(key=lambda r: r["index"])  # batches finish out of order: restore the input order
    if [r["index"] for r in rows] != list(range(len(records))):
        sys.exit(f"error: got {len(rows)} completions for {len(records)} prompts")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.writelines(r["line"] + "\n" for r in rows)
    print(f"wrote {len(rows)} completions to {args.output}")
    ray.shutdown()


if __name__ == "__main__":
    main()
