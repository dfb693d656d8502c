"""`moe-offload quantize`: write a checkpoint folder whose routed experts are packed int8 / int4
(compressed-tensors pack-quantized, see quant/ckpt.py), everything else as it was.

Streaming: the source is read through its memory map one expert at a time and written one shard per
layer (shard 0: the non-expert weights), so peak RAM is about one layer's quantized experts plus the
largest non-expert tensor. The folder is built under a temporary name next to --out and renamed at
the end: a failure leaves nothing behind. Quantization is the quantize-on-load code (the format's
pack, moe_offload.formats) on the same input, so `load(out)` gives bit for bit the logits of `load(model, expert_dtype=...)`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint
from ..errors import MoeOffloadError
from ..formats import get_format
from .ckpt import check_format, packed_expert_tensors, quantization_config


def quantize_checkpoint(model: str | os.PathLike, out: str | os.PathLike, fmt: str, group_size: int = 128,
                        force: bool = False, show_progress: bool = False) -> dict[str, Any]:
    """Quantize the routed experts of `model` into a new folder `out`; returns a summary dict."""
    check_format(fmt)
    src, dst = Path(model), Path(out)
    ckpt = Checkpoint(src)
    cfg = ckpt.config
    if cfg.expert_format is not None:
        raise MoeOffloadError(f"{src}: its experts are quantized already ({cfg.expert_format})")
    if fmt != "int8":
        for dim, what in ((cfg.hidden_size, "hidden_size"), (cfg.intermediate_size, "the expert width")):
            if dim % group_size:
                raise MoeOffloadError(f"--group-size {group_size} does not divide {what} {dim} of {src}; "
                                      "choose 32, 64 or 128 dividing it")
    _check_separate(src, dst)
    _check_out(dst, force)
    ckpt.validate()
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise MoeOffloadError(f"--out {dst}: cannot create a folder beside it ({exc.strerror})") from None
    try:
        summary = _write(ckpt, src, tmp, fmt, group_size, show_progress)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**summary, "out": str(dst)}


def _check_separate(src: Path, dst: Path) -> None:
    """The output folder may not be, contain or lie inside the source folder: the source is never written."""
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        where = "is" if s == d else "lies inside" if s in d.parents else "contains"
        raise MoeOffloadError(f"--out {dst} {where} the --model folder {src}; write the quantized checkpoint to a "
                              "separate folder (the source is never modified)")


def _check_out(dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise MoeOffloadError(f"--out {dst}: exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise MoeOffloadError(f"--out {dst}: folder exists and is not empty; pass --force to replace it")
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise MoeOffloadError(f"--out {dst}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise MoeOffloadError(f"--out {dst}: folder {parent} is not writable")


def _ignore_list(cfg: Any) -> list[str]:
    """Every linear layer that stays unquantized, in compressed-tensors' ignore syntax."""
    ignore = ["lm_head", "re:.*self_attn.*", "re:.*\\.gate$"]
    if cfg.shared_expert_intermediate_size:
        ignore += ["re:.*shared_expert.*", "re:.*shared_expert_gate$"]
    return ignore


def _write(ckpt: Checkpoint, src: Path, tmp: Path, fmt: str, group_size: int, show_progress: bool) -> dict[str, Any]:
    cfg = ckpt.config
    if cfg.first_k_dense_replace:
        raise MoeOffloadError(f"{src}: quantize does not write models with dense first layers (first_k_dense_replace "
                              f"{cfg.first_k_dense_replace}) yet; load it with expert_dtype='int4' or 'int8' instead")
    if cfg.expert_bias or cfg.swiglu_limit is not None:
        raise MoeOffloadError(f"{src}: quantize does not write {cfg.model_type} experts (with biases and the clamped "
                              "SwiGLU) yet; they run in the compute dtype")
    for f in src.iterdir():  # tokenizer and other side files, as they are
        if f.is_file() and f.name not in ("config.json", SINGLE_FILE, INDEX_FILE) and f.suffix != ".safetensors":
            shutil.copy2(f, tmp / f.name)
    raw = json.loads((src / "config.json").read_text(encoding="utf-8"))
    raw["quantization_config"] = quantization_config(fmt, group_size, _ignore_list(cfg))
    (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    packer = get_format(fmt, group_size)
    L, E, H, I = cfg.num_hidden_layers, cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    expert_names = {cfg.family.expert_name(l, e, w) for l in range(L) for e in range(E) for w in ("w1", "w2", "w3")}
    n_shards = L + 1
    weight_map: dict[str, str] = {}
    total = 0

    def save(tensors: dict[str, torch.Tensor], i: int) -> None:
        nonlocal total
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    save({n: ckpt.tensor(n).contiguous() for n in ckpt.iter_names() if n not in expert_names}, 0)
    with torch.no_grad(), tqdm(total=L * E, unit="expert", desc=f"quantizing experts to {fmt}",
                               disable=not show_progress) as bar:
        for layer in range(L):
            shard: dict[str, torch.Tensor] = {}
            for e in range(E):
                names = {w: cfg.family.expert_name(layer, e, w) for w in ("w1", "w3", "w2")}
                sections = packer.pack(*(ckpt.tensor(names[w]) for w in ("w1", "w3", "w2")))
                shard.update(packed_expert_tensors(sections, names, fmt, H, I))
                bar.update()
            save(shard, layer + 1)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return {"expert_dtype": fmt, "group_size": group_size if fmt != "int8" else None, "shards": n_shards,
            "bytes": total}
