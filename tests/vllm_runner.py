"""Run one vLLM engine on token-id prompts and write what the vLLM plugin tests compare (a helper of
tests/test_vllm_plugin.py and benchmarks/vllm_plugin.py; its own process, since vLLM spawns workers).

    python tests/vllm_runner.py '{"model": DIR, "tp": 1, "moe_offload": {...} | null, "plugins": true,
                                  "prompts": [[ids], ...], "max_tokens": 32, "out": PATH}'

plugins false: vLLM without any general plugin (VLLM_PLUGINS=""), i.e. plain vLLM.
Writes {"solo": [...], "batch": [...], "registered": [...per rank...], "stats_start": {...}, "stats": {...},
"seconds": {...}} (stats: the plugin's stats files, by path, after start-up and at the end).
"""

from __future__ import annotations

import json
import os
import sys
import time


def registered_bytes(worker) -> dict:
    """Bytes of the model's registered parameters and buffers (each storage once), and of its routed-
    experts modules (collective_rpc: runs in every worker)."""
    model = worker.model_runner.model
    seen, total, experts = set(), 0, 0
    for mod_name, mod in model.named_modules():
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            key = (t.untyped_storage().data_ptr(), t.data_ptr())
            if key in seen:
                continue
            seen.add(key)
            n = t.numel() * t.element_size()
            total += n
            if hasattr(mod, "w13_weight"):
                experts += n
    return {"total": total, "routed_experts": experts}


def _result(out) -> dict:
    o = out.outputs[0]
    if o.logprobs is None:
        return {"tokens": list(o.token_ids)}
    prompt_lp = [None if d is None else d[t].logprob for d, t in zip(out.prompt_logprobs, out.prompt_token_ids)]
    return {"tokens": list(o.token_ids), "logprobs": [d[t].logprob for d, t in zip(o.logprobs, o.token_ids)],
            "prompt_logprobs": prompt_lp}


def main(args: dict) -> None:
    if not args.get("plugins", True):
        os.environ["VLLM_PLUGINS"] = ""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc(registered_bytes)
    if args.get("tp", 1) > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(args["tp"])))
    from vllm import LLM, SamplingParams

    kw = dict(dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=256, max_num_seqs=8,
              tensor_parallel_size=args.get("tp", 1), seed=0)
    if args.get("tp", 1) > 1:
        kw["distributed_executor_backend"] = "mp"
    if args.get("moe_offload") is not None:
        kw["additional_config"] = {"moe_offload": args["moe_offload"]}
    t0 = time.perf_counter()
    llm = LLM(args["model"], **kw)
    start = time.perf_counter() - t0
    path = (args.get("moe_offload") or {}).get("stats_path")
    tp = args.get("tp", 1)
    files = ([path.replace("{rank}", str(r)) for r in range(tp)] if "{rank}" in path else [path]) if path else []

    def stats() -> dict:
        return {f: json.load(open(f)) for f in files if os.path.exists(f)}
    lp = 1 if args.get("logprobs", True) else None
    sp = SamplingParams(temperature=0, max_tokens=args.get("max_tokens", 32), logprobs=lp, prompt_logprobs=lp,
                        ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in args["prompts"]]
    res: dict = {"seconds": {"start": start}}
    if files:
        res["stats_start"] = stats()  # after vLLM's start-up runs (profiling, warm-up)
    if args.get("solo", True):
        t0 = time.perf_counter()
        res["solo"] = [_result(llm.generate([p], sp, use_tqdm=False)[0]) for p in prompts]
        res["seconds"]["solo"] = time.perf_counter() - t0
    if args.get("batch", True):
        t0 = time.perf_counter()
        res["batch"] = [_result(o) for o in llm.generate(prompts, sp, use_tqdm=False)]
        res["seconds"]["batch"] = time.perf_counter() - t0
    res["registered"] = llm.collective_rpc(registered_bytes)
    if files:
        res["stats"] = stats()
    with open(args["out"], "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
