"""Host tier (protocols.ExpertStore): every expert (w1, w3, w2) packed contiguously inside one large (pinned) host
allocation, or (a GGUF file) read in place from the file's memory map."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import psutil
import torch
from tqdm.auto import tqdm

from ..kernels import hostmem
from ..checkpoint import Checkpoint, check_finite, expert_name, fused_packed
from ..errors import CheckpointError, MoeOffloadError
from ..formats import DEFAULT_GROUP_SIZE, ExpertFormat, float_format, get_format, hub_format_of
from ..quant.ckpt import read_packed_expert
from .rows import Segments, Stacked, copy_row

# Leave this much RAM to the rest of the machine when checking that the store fits.
HOST_RAM_MARGIN = 1 << 30


def available_host_bytes() -> int:
    """Host RAM that can be allocated without swapping (psutil's `available`)."""
    return int(psutil.virtual_memory().available)


def check_host_ram(needed: int, what: str) -> None:
    avail = available_host_bytes()
    if needed > avail - HOST_RAM_MARGIN:
        raise MoeOffloadError(
            f"host RAM too small for {what}: needs {needed:,} bytes ({needed / 1e9:.2f} GB), "
            f"{avail:,} bytes ({avail / 1e9:.2f} GB) available and {HOST_RAM_MARGIN / 1e9:.2f} GB kept free; "
            "use a smaller expert dtype or a machine with more RAM")


def as_format(fmt: ExpertFormat | str | None, group_size: int, dtype: torch.dtype) -> ExpertFormat:
    """An expert format given as an object, a name, or None (experts in the compute dtype `dtype`)."""
    if isinstance(fmt, ExpertFormat):
        return fmt
    return float_format(dtype) if fmt is None else get_format(fmt, group_size, dtype)


class HostExpertStore:
    """All experts of a model in host memory, one row per expert (layout: each layer's expert format's;
    [w1 | w3 | w2] flattened for float experts, packed sections for int8 / int4 / GGUF / hub formats, a hub
    format's rows the file's bytes, GPT-OSS's MXFP4 blocks, scales and biases included).

    `row(layer, e)` is one expert, so one host-to-device copy moves it: a contiguous row of the store's
    buffer, or (`mapped`: a GGUF file, or a safetensors checkpoint read in place) its pieces of the file's
    memory map (rows.Segments), read in place: the file is never copied into RAM, the OS page cache is
    the host tier. The buffer is pinned when `pin` is True (CUDA runs), so copies can run asynchronously
    on a copy stream; a mapped store is pageable (the CUDA driver stages its copies through its own
    bounded buffer).

    `mapped` (instead of a buffer): per layer, the file's tensors of that layer's experts, one per
    section of the layer format's row in row order (formats' layout(): GGUF gate, up, down; float w1,
    w3, w2; a hub format's sections), each [E, *shape]: a tensor, or a rows.Stacked of one tensor per
    expert. Expert e's row is Segments([section[e] for each section]); layer_pool() the format's
    tensor_pool over them.

    `format` (an ExpertFormat, moe_offload.formats; `fmt` as a name or None: the compute dtype `dtype`)
    packs experts as they are put; `formats[layer]` is each layer's (format.per_layer: all the same
    unless a GGUF file's layers differ), `layer_bytes[layer]` one expert of that layer, `expert_bytes`
    the largest (one device slot), `host_bytes` all of them.
    """

    def __init__(self, num_layers: int, num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
                 pin: bool = False, fmt: ExpertFormat | str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
                 mapped: list[Sequence[Any]] | None = None):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.hidden, self.inter, self.dtype = hidden, inter, dtype
        self.format = as_format(fmt, group_size, dtype)
        try:
            self.formats = self.format.per_layer(num_layers)
        except ValueError as exc:
            raise MoeOffloadError(str(exc)) from None
        self.layer_bytes = [f.expert_bytes(hidden, inter) for f in self.formats]
        self.expert_bytes = max(self.layer_bytes)  # one device slot
        self.row_lengths = [f.row_length(hidden, inter) for f in self.formats]
        self.expert_elems = max(self.row_lengths)
        self.host_bytes = num_experts * sum(self.layer_bytes)
        self.mapped = mapped is not None
        self.pinned = pin and not self.mapped
        if self.mapped:  # a file's expert tensors per layer, by row section (see the class docstring)
            if len(mapped) != num_layers:
                raise MoeOffloadError(f"a mapped store needs {num_layers} layers of expert tensors, got {len(mapped)}")
            self.buffer = None
            self.layer_rows = None
            self._mapped = [list(secs) for secs in mapped]
            self._rows = [[Segments([sec[e] for sec in secs]) for e in range(num_experts)] for secs in self._mapped]
            return
        check_host_ram(self.host_bytes, "the host expert store")
        n, dt = num_experts * sum(self.row_lengths), self.format.row_dtype
        flat = torch.empty(n, dtype=dt, pin_memory=True) if pin else hostmem.empty(n, dt)  # huge pages on the CPU
        self.layer_rows, off = [], 0  # [E, row] per layer, views of one allocation
        for n in self.row_lengths:
            self.layer_rows.append(flat[off: off + num_experts * n].view(num_experts, n))
            off += num_experts * n
        uniform = len(set(self.row_lengths)) == 1
        self.buffer = flat.view(num_layers * num_experts, self.expert_elems) if uniform else flat
        self._rows = self.layer_rows

    def row(self, layer: int, e: int) -> torch.Tensor | Segments:
        """Expert (layer, e) as one contiguous row (a buffer store) or its pieces of the file (mapped)."""
        return self._rows[layer][e]

    def allocate_pool(self, num_slots: int, device: torch.device) -> torch.Tensor:
        """An uninitialised device pool [S, row] in the store's row dtype, a row as long as the largest
        layer's (a layer's expert fills the first row_lengths[layer] elements of its slot)."""
        return hostmem.empty((num_slots, self.expert_elems), self.format.row_dtype, device)

    def pool_views(self, pool: torch.Tensor, layer: int = 0) -> tuple[Any, torch.Tensor | None]:
        """(w13, w2) of a pool [S, row] as the kernels take them when it holds `layer`'s experts: float
        views [S, 2I, H] and [S, H, I], or (the format's WeightPool, None) for a packed format."""
        rows = pool[:, : self.row_lengths[layer]]
        return self.formats[layer].pool_views(rows, self.hidden, self.inter).as_views()

    def layer_pool(self, layer: int, experts: slice = slice(None)) -> Any:
        """The format's WeightPool over `layer`'s experts (slot = expert id; `experts` a slice of them)
        in host memory, no copy: the buffer's rows, or the file's memory map."""
        fmt = self.formats[layer]
        if self.mapped:  # the format's pool straight over the file's tensors, sections in row order
            return fmt.tensor_pool(*[sec[experts] for sec in self._mapped[layer]], self.hidden, self.inter)
        return fmt.pool_views(self.layer_rows[layer][experts], self.hidden, self.inter)

    def layer_rows_on(self, layer: int, device: torch.device) -> torch.Tensor:
        """`layer`'s expert rows [E, row] copied to `device` (the resident run on an accelerator)."""
        if not self.mapped:
            return self.layer_rows[layer].to(device)
        out = torch.empty(self.num_experts, self.row_lengths[layer], dtype=self.formats[layer].row_dtype,
                          device=device)
        for e in range(self.num_experts):
            copy_row(out[e], self.row(layer, e))
        return out

    def cpu_expert(self, layer: int, e: int) -> Any:
        """Expert (layer, e) prepared to run on the host in the compute dtype: an object whose ffn(0, x)
        runs it (the format's CPU op where it has one) and whose extra_bytes is the RAM that costs."""
        return self.formats[layer].cpu_pool(self.layer_pool(layer, slice(e, e + 1)), self.dtype)

    def w13(self, layer: int, e: int) -> torch.Tensor:
        """Float stores: expert (layer, e)'s w13 [2I, H] (a view of its row; mapped: w1 and w3 gathered)."""
        if self.mapped:
            return self.layer_pool(layer, slice(e, e + 1)).dequant_projection("w13", 0)
        return self.row(layer, e)[: 2 * self.inter * self.hidden].view(2 * self.inter, self.hidden)

    def w2(self, layer: int, e: int) -> torch.Tensor:
        """Float stores: expert (layer, e)'s w2 [H, I] (a view of its row, or of the file)."""
        if self.mapped:
            return self.layer_pool(layer, slice(e, e + 1)).dequant_projection("w2", 0)
        return self.row(layer, e)[2 * self.inter * self.hidden:].view(self.hidden, self.inter)

    def put(self, layer: int, e: int, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
            bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Store one expert from its three matrices (w1, w3: [I, H]; w2: [H, I]), packed by the format;
        bias (b13 [2I], b2 [H]): its biases, for a float format with bias sections (GPT-OSS)."""
        if self.mapped:
            raise MoeOffloadError("this expert store reads a file's memory map; experts cannot be put into it")
        if bias is None:
            self.formats[layer].put(self.row(layer, e), w1, w3, w2, self.hidden, self.inter)
        else:
            self.formats[layer].put(self.row(layer, e), w1, w3, w2, self.hidden, self.inter, bias=bias)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dtype: torch.dtype, pin: bool = False,
                        show_progress: bool = False, fmt: ExpertFormat | str | None = None,
                        group_size: int = DEFAULT_GROUP_SIZE, map_file: bool | None = None) -> "HostExpertStore":
        """The store of a checkpoint's experts in format `fmt`.

        A GGUF file's experts are never copied: the store reads its memory map. So can a safetensors
        checkpoint's whose expert bytes are exactly the format's rows (in_place_experts: float experts
        stored in the compute dtype, a hub format as shipped, GPT-OSS's fused MXFP4 slices); map_file
        None (auto) reads them in place when `pin` is False (a CPU run, or rows copied to the device once:
        no host copy is strictly better) or when the copied store would not fit in the RAM available,
        and keeps the pinned copy otherwise (a CUDA run's asynchronous copies need pinned memory);
        True: in place or MoeOffloadError saying why not; False: always a copy. A store read in place
        that fits in RAM has its experts checked for NaN/Inf as the copy would be (a pass over the file,
        which also fills the page cache); one larger than RAM warns with the shortfall and the projected
        disk-bound speed instead (warn_if_larger_than_ram), unscanned.

        Otherwise the store is filled from the checkpoint's memory map, one expert at a time (quantized
        on the way in for a packed format: only one expert is ever held unquantized)."""
        cfg = ckpt.config
        fmt = as_format(fmt, group_size, dtype)
        group_size = fmt.group_size
        if cfg.expert_format is not None and (fmt.name, group_size) != (cfg.expert_format, cfg.expert_group_size):
            raise MoeOffloadError(f"{ckpt.path} holds {cfg.expert_format} experts (group size "
                                  f"{cfg.expert_group_size}); they cannot be stored as {fmt.name} / {group_size}")
        H, I = cfg.hidden_size, cfg.intermediate_size
        if cfg.expert_bias != bool(getattr(fmt, "bias", False)):
            raise MoeOffloadError(f"{ckpt.path}: the {cfg.model_type} experts {'have' if cfg.expert_bias else 'lack'} "
                                  f"biases; the expert format {fmt!r} {'lacks' if cfg.expert_bias else 'has'} them "
                                  "(GPT-OSS experts are stored with their biases: in the compute dtype, or MXFP4 as "
                                  "shipped)")
        fused = fused_packed(cfg)
        if hasattr(ckpt, "expert_tensors"):  # a GGUF file: its memory map, as it is
            mapped = [ckpt.expert_tensors(layer) for layer in range(cfg.num_moe_layers)]
            store = cls(cfg.num_moe_layers, cfg.num_local_experts, H, I, dtype, pin, fmt, mapped=mapped)
            warn_if_larger_than_ram(store.host_bytes, str(ckpt.path), cfg.num_experts_per_tok * sum(store.layer_bytes))
            return store
        fits = _store_bytes(cfg, fmt) <= available_host_bytes() - HOST_RAM_MARGIN
        if map_file or (map_file is None and (not pin or not fits)):
            mapped, why, reader = in_place_experts(ckpt, fmt)
            if mapped is None and map_file:
                raise MoeOffloadError(f"{ckpt.path}: its experts cannot be read in place from the file's memory map: "
                                      f"{why}")
            if mapped is not None:
                store = cls(cfg.num_moe_layers, cfg.num_local_experts, H, I, dtype, pin, fmt, mapped=mapped)
                if fits:  # what the copy checks as it reads: no NaN/Inf in any expert tensor
                    for t, what in tqdm(reader.handed, unit="tensor", desc="checking experts in the file",
                                        disable=not show_progress):
                        check_finite(t, what)
                warn_if_larger_than_ram(store.host_bytes, str(ckpt.path),
                                        cfg.num_experts_per_tok * sum(store.layer_bytes),
                                        note="not scanned for NaN/Inf at load")
                return store
        store = cls(cfg.num_moe_layers, cfg.num_local_experts, H, I, dtype, pin, fmt)
        with torch.no_grad(), tqdm(total=cfg.num_moe_layers * cfg.num_local_experts, unit="expert",
                                   desc="loading experts to host", disable=not show_progress) as bar:
            for layer in range(cfg.num_moe_layers):  # MoE layer `layer` is the model's first_k_dense_replace + layer
                for e in range(cfg.num_local_experts):
                    names = {w: expert_name(cfg.first_k_dense_replace + layer, e, w, cfg.model_type)
                             for w in ("w1", "w3", "w2")}
                    if fused:  # a layer's experts packed in fused tensors (GPT-OSS MXFP4): this expert's slices
                        sections = cfg.family.read_packed_expert(ckpt, cfg, cfg.first_k_dense_replace + layer, e)
                        try:
                            store.formats[layer].write(store.row(layer, e), sections, H, I)
                        except ValueError as exc:
                            raise MoeOffloadError(f"{ckpt.path}: expert {e} of layer "
                                                  f"{cfg.first_k_dense_replace + layer}: {exc}") from None
                    elif cfg.expert_format is not None:  # already packed on disk: no requantization
                        sections = read_packed_expert(ckpt.tensor, names, fmt.name, group_size, cfg.expert_symmetric,
                                                      H, I)
                        store.formats[layer].write(store.row(layer, e), sections, H, I)
                    else:  # as the family stores them (one tensor per weight, or a layer's experts fused)
                        w1, w3, w2, bias = cfg.family.read_expert(ckpt, cfg, cfg.first_k_dense_replace + layer, e)
                        store.put(layer, e, w1, w3, w2, bias)
                    bar.update()
        return store


def _store_bytes(cfg: Any, fmt: ExpertFormat) -> int:
    """Host bytes of every expert of `cfg` in `fmt` (what a copied store allocates)."""
    try:
        layers = fmt.per_layer(cfg.num_moe_layers)
    except ValueError as exc:
        raise MoeOffloadError(str(exc)) from None
    return cfg.num_local_experts * sum(f.expert_bytes(cfg.hidden_size, cfg.intermediate_size) for f in layers)


def in_place_experts(ckpt: Any, fmt: ExpertFormat, probe: bool = False
                     ) -> tuple[list[list[Stacked]] | None, str, Any]:
    """A safetensors checkpoint's routed experts as they lie in its files, where the bytes of each are
    exactly the row `fmt` holds: (per MoE layer, the file's tensors of each row section of that layer's
    format in row order, a rows.Stacked of one view of the memory map per expert; "", the reader, whose
    `handed` lists every view with its name), else (None, why not, None).

    The families' own read functions name and slice the tensors (read_expert, read_packed_expert, the
    hub reader and its checks), asked through Checkpoint.in_place(), which answers with views of the
    maps; a section that comes back converted (another dtype, transposed, concatenated: not a view of
    the file, Checkpoint.in_map) or of another dtype or shape than the format's row section means a
    copy. probe: the first expert of each layer only (whether the store would read in place, cheaply)."""
    cfg = ckpt.config
    if not hasattr(ckpt, "in_place"):
        return None, "not a safetensors checkpoint", None
    H, I = cfg.hidden_size, cfg.intermediate_size
    if cfg.expert_format is not None and fmt.name != cfg.expert_format:
        return None, f"its experts are stored as {cfg.expert_format}, not {fmt.name}", None
    if cfg.expert_format is None:
        if fmt.quantized:
            return None, f"its float experts are quantized to {fmt.name} as they load", None

        def read(r: Any, layer: int, e: int) -> dict[str, Any]:
            w1, w3, w2, bias = cfg.family.read_expert(r, cfg, layer, e)
            return {"w1": w1, "w3": w3, "w2": w2, **({} if bias is None else {"b13": bias[0], "b2": bias[1]})}
    elif fused_packed(cfg):
        def read(r: Any, layer: int, e: int) -> dict[str, Any]:
            return cfg.family.read_packed_expert(r, cfg, layer, e)
    elif hub_format_of(cfg.expert_format) is not None:
        def read(r: Any, layer: int, e: int) -> dict[str, Any]:
            names = {w: cfg.family.expert_name(layer, e, w) for w in ("w1", "w3", "w2")}
            return read_packed_expert(r.tensor, names, fmt.name, fmt.group_size, cfg.expert_symmetric, H, I)
    else:
        return None, (f"its {cfg.expert_format} experts (moe-offload's own export) are repacked into the store's "
                      "rows"), None
    try:
        formats = fmt.per_layer(cfg.num_moe_layers)
    except ValueError as exc:
        raise MoeOffloadError(str(exc)) from None
    if not all(hasattr(f, "layout") and hasattr(f, "tensor_pool") for f in formats):
        return None, f"the {fmt.name} rows are not the file's bytes", None
    reader = ckpt.in_place()
    layers: list[list[Stacked]] = []
    with torch.no_grad():
        for layer in range(cfg.num_moe_layers):
            secs = formats[layer].layout(H, I)
            experts = []
            for e in range(1 if probe else cfg.num_local_experts):
                got = read(reader, cfg.first_k_dense_replace + layer, e)
                for sec in secs:
                    t = got.get(sec.name)
                    where = f"expert {e} of layer {cfg.first_k_dense_replace + layer}, {sec.name}"
                    if t is None:
                        return None, f"{where}: not in the file", None
                    if t.dtype != sec.dtype:
                        return None, (f"{where}: stored as {str(t.dtype).removeprefix('torch.')}, the {fmt.name} rows "
                                      f"hold {str(sec.dtype).removeprefix('torch.')}"), None
                    if tuple(t.shape) != sec.shape or not ckpt.in_map(t):
                        return None, f"{where}: the file stores it in another layout (converted as it is read)", None
                experts.append([got[sec.name] for sec in secs])
            layers.append([Stacked([x[i] for x in experts]) for i in range(len(secs))])
    return layers, "", reader


def reads_in_place(ckpt: Any, fmt: ExpertFormat | str | None, dtype: torch.dtype, pin: bool = False,
                   group_size: int = DEFAULT_GROUP_SIZE) -> bool:
    """Whether HostExpertStore.from_checkpoint(ckpt, dtype, pin, fmt=fmt) (map_file auto) reads the
    experts in place from the file's memory map rather than copying them into RAM: a GGUF file always;
    a safetensors checkpoint whose expert bytes are the rows as stored, when `pin` is False or the copy
    would not fit in RAM. Cheap (headers, and one expert per layer); False for a checkpoint that does
    not read (its error comes when it is loaded)."""
    if hasattr(ckpt, "expert_tensors"):
        return True
    fmt = as_format(fmt, group_size, dtype)
    if pin and _store_bytes(ckpt.config, fmt) <= available_host_bytes() - HOST_RAM_MARGIN:
        return False
    try:
        mapped, _, _ = in_place_experts(ckpt, fmt, probe=True)
    except (CheckpointError, MoeOffloadError):
        return False
    return mapped is not None


# What a disk-bound decode reads per second when the page cache cannot hold the experts (an NVMe SSD's
# sequential read; the projection in the warning, not a measurement).
DISK_BYTES_PER_SECOND = 3e9


def warn_if_larger_than_ram(nbytes: int, what: str, token_bytes: int = 0, note: str = "") -> None:
    """A memory-mapped store larger than the RAM available still loads (the OS reads experts from disk
    as they are used); warn naming the shortfall and the projected disk-bound decode speed (token_bytes:
    the expert bytes one token reads, of which the share that does not fit comes from disk); `note`:
    appended about the experts (e.g. that they were not scanned)."""
    avail = max(available_host_bytes() - HOST_RAM_MARGIN, 0)
    if nbytes <= avail:
        return
    short = nbytes - avail
    speed = ""
    if token_bytes:
        from_disk = token_bytes * short / nbytes
        speed = f"; projected disk-bound decode about {DISK_BYTES_PER_SECOND / from_disk:.2g} tokens/s"
    warnings.warn(f"{what}: its experts ({nbytes / 1e9:.2f} GB) exceed the RAM available ({avail / 1e9:.2f} GB after "
                  f"{HOST_RAM_MARGIN / 1e9:.2f} GB kept free) by {short / 1e9:.2f} GB; they are read from the file's "
                  f"memory map, so experts outside the page cache come from disk (at "
                  f"{DISK_BYTES_PER_SECOND / 1e9:.0f} GB/s, an NVMe SSD){speed}{'; experts ' + note if note else ''}",
                  UserWarning, stacklevel=3)
