"""Exponential moving average of the trained weights, sharded like the optimizer: each rank keeps the EMA of
the fp32 fragment of every parameter that it owns, so an update moves nothing between ranks.

A rank's fragment of a parameter is a contiguous range of the parameter's flattened elements: the fp32 master
partition DeepSpeed keeps on that rank (ZeRO-1/2 and the bf16 optimizer: ``_hp_mapping``; ZeRO-3: the local
partition, ``rank * partition_size`` onwards) or, for ZeRO-0 where every rank holds the whole fp32 weights
(16-bit training: the fp32 masters of DeepSpeed's fp16 optimizer wrapper), an even slice. Checkpoints store each rank's fragments with their offsets
(``ema/rank_NNNNN.safetensors``), so they load at any world size and are stitched into full tensors offline
(export) or, during a run, by one all-reduce (sample grids, evaluation). The decay warms up as in LDM's
LitEma: min(decay, (1 + n) / (10 + n)) after n updates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from data_pipeline.atomic import atomic_save

FOLDER = "ema"


@dataclass
class Fragment:
    """This rank's contiguous piece ``[offset, offset + numel)`` of one flattened parameter."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    view: torch.Tensor | None  # the live fp32 values (1-D), None when only the layout is known


def local_fragments(module: nn.Module, rank: int, world: int) -> list[Fragment]:
    """The fp32 fragments of ``module``'s trainable parameters that this rank owns."""
    out = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):  # ZeRO-3: the local partition of the fp32 master weights
            from deepspeed.utils import safe_get_local_fp32_param

            local = safe_get_local_fp32_param(p).view(-1)
            size, full = p.ds_tensor.ds_numel, p.ds_numel
            offset = min(rank * size, full)
            out.append(Fragment(name, tuple(p.ds_shape), offset, min(size, full - offset), local))
        elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO-1/2, bf16 optimizer: the master partition
            m = p._hp_mapping
            view = m.hp_fragment.view(-1)
            out.append(Fragment(name, tuple(p.shape), m.lp_fragment_address.start, view.numel(), view))
        elif hasattr(p, "_hp_mapping"):
            continue  # another rank owns all of it
        else:  # ZeRO-0: replicated fp32 weights (16-bit ones: their fp32 masters), an even slice each
            flat = getattr(p, "ldm_fp32_master", p).detach().view(-1)
            step = math.ceil(flat.numel() / world)
            offset = min(rank * step, flat.numel())
            out.append(
                Fragment(name, tuple(p.shape), offset, min(step, flat.numel() - offset), flat[offset:])
            )
    for f in out:
        f.view = f.view[: f.numel] if f.view is not None else None
    return out


class ShardedEMA:
    """The EMA of this rank's fp32 fragments (``on_cpu``: kept in host memory, updated from a copy)."""

    def __init__(self, decay: float, rank: int, world: int, on_cpu: bool = False):
        self.decay, self.rank, self.world, self.on_cpu = decay, rank, world, on_cpu
        self.fragments: list[Fragment] = []
        self.shadow: list[torch.Tensor] = []
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def attach(self, module: nn.Module, initialize: bool) -> None:
        """(Re)bind to the module's live fp32 fragments (after DeepSpeed loads a checkpoint its views change);
        with ``initialize``, start the EMA from the current weights."""
        self.fragments = [f for f in local_fragments(module, self.rank, self.world) if f.numel > 0]
        if initialize:
            self.shadow = [self._home(f.view.detach().float()).clone() for f in self.fragments]
            self.updates = 0

    def _home(self, t: torch.Tensor) -> torch.Tensor:
        return t.to("cpu", non_blocking=True) if self.on_cpu else t

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in: a local lerp per fragment, no communication."""
        if self.shadow:
            current = [self._home(f.view) for f in self.fragments]
            torch._foreach_lerp_(self.shadow, current, 1.0 - self.current_decay())
        self.updates += 1

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """This rank's fragments, with their offsets, as ``<folder>/ema/rank_NNNNN.safetensors``."""
        tensors = {
            f.name: s.detach().cpu().contiguous() for f, s in zip(self.fragments, self.shadow, strict=True)
        }
        layout = {f.name: [f.offset, f.numel, list(f.shape)] for f in self.fragments}
        meta = {"layout": json.dumps(layout), "updates": str(self.updates), "world_size": str(self.world)}
        path = Path(folder) / FOLDER / f"rank_{self.rank:05d}.safetensors"
        atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @torch.no_grad()
    def load(self, folder: Path, module: nn.Module) -> None:
        """Re-attach to ``module`` (just loaded) and read this rank's fragments from the fragments any number
        of ranks saved (elastic); a checkpoint without an EMA starts it from the loaded weights."""
        self.attach(module, initialize=not saved_ema(Path(folder)))
        if not saved_ema(Path(folder)):
            return
        pieces = read_layouts(Path(folder))
        self.shadow = []
        for f in self.fragments:
            shadow = torch.empty(f.numel, dtype=torch.float32)
            for path, offset, numel in pieces.get(f.name, []):
                lo, hi = max(offset, f.offset), min(offset + numel, f.offset + f.numel)
                if lo < hi:
                    with safe_open(str(path), "pt") as src:
                        shadow[lo - f.offset : hi - f.offset] = src.get_slice(f.name)[
                            lo - offset : hi - offset
                        ]
            self.shadow.append(shadow if self.on_cpu else shadow.to(f.view.device))
        self.updates = max((int(m["updates"]) for m in _metas(Path(folder))), default=0)

    @torch.no_grad()
    def full(self) -> dict[str, torch.Tensor]:
        """The full EMA tensors on every rank (one all-reduce per parameter: for samples and evaluation)."""
        out = {}
        for f, s in zip(self.fragments, self.shadow, strict=True):
            out.setdefault(f.name, torch.zeros(math.prod(f.shape), dtype=torch.float32, device=s.device))
            out[f.name][f.offset : f.offset + f.numel] = s
        shapes = shape_of(self.fragments)
        if dist.is_available() and dist.is_initialized():
            shapes = _all_shapes(shapes)  # a rank may own no piece of some parameter
            for name in sorted(shapes):
                if name not in out:
                    out[name] = torch.zeros(
                        math.prod(shapes[name]), dtype=torch.float32, device=_device(self)
                    )
                dist.all_reduce(out[name])
        return {name: out[name].view(shapes[name]) for name in sorted(shapes)}


def shape_of(fragments: list[Fragment]) -> dict[str, tuple[int, ...]]:
    return {f.name: f.shape for f in fragments}


def _device(ema: ShardedEMA) -> torch.device:
    return ema.shadow[0].device if ema.shadow else torch.device("cpu")


def _all_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, shapes)
    return {k: tuple(v) for g in gathered for k, v in g.items()}


def _metas(folder: Path) -> list[dict]:
    out = []
    for path in sorted((folder / FOLDER).glob("rank_*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.append({**f.metadata(), "path": str(path)})
    return out


def read_layouts(folder: Path) -> dict[str, list[tuple[Path, int, int]]]:
    """For each parameter: (file, offset, numel) of every saved fragment."""
    pieces: dict[str, list[tuple[Path, int, int]]] = {}
    for meta in _metas(folder):
        for name, (offset, numel, _shape) in json.loads(meta["layout"]).items():
            pieces.setdefault(name, []).append((Path(meta["path"]), offset, numel))
    return pieces


def saved_ema(folder: Path) -> bool:
    return any((Path(folder) / FOLDER).glob("rank_*.safetensors"))


@torch.no_grad()
def stitch(folder: Path) -> dict[str, torch.Tensor]:
    """The full EMA tensors from a checkpoint's fragments (offline: export, ldm-sample)."""
    shapes: dict[str, list[int]] = {}
    for meta in _metas(Path(folder)):
        shapes |= {name: shape for name, (_o, _n, shape) in json.loads(meta["layout"]).items()}
    full = {name: torch.zeros(math.prod(shape), dtype=torch.float32) for name, shape in shapes.items()}
    for name, pieces in read_layouts(Path(folder)).items():
        for path, offset, numel in pieces:
            with safe_open(str(path), "pt") as src:
                full[name][offset : offset + numel] = src.get_tensor(name)
    return {name: t.view(shapes[name]) for name, t in full.items()}


def full_fp32_params(module: nn.Module, zero_stage: int, mixed: bool):
    """Yield (name, full fp32 tensor) for the trainable parameters; a collective under ZeRO-3 or bf16 (tests
    and ``faults.dump_weights`` only)."""
    direct = not mixed and zero_stage < 3
    if not direct:
        from deepspeed.utils import safe_get_full_fp32_param
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if direct:
            yield name, p.detach().float()
            continue
        full = safe_get_full_fp32_param(p)
        if full is None:  # 16-bit ZeRO-0: the optimizer's fp32 master (deepspeed_setup.link_fp32_masters)
            full = getattr(p, "ldm_fp32_master", p)
        yield name, full.detach().float()
