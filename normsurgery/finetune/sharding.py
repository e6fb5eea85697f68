"""FSDP (version 2) for the fine-tunes: each decoder block sharded over the processes, the whole state gathered
back on the main process for the export.

accelerate sets up FSDP only on accelerators: on CPU processes (`ACCELERATE_USE_CPU=true torchrun ...`) it runs
plain DDP whatever `ACCELERATE_USE_FSDP` says. So normsurgery shards the model itself, with torch's
`fully_shard`, in both cases (one layout, the one the CPU tests run), and hands accelerate the sharded model on
GPUs (its FSDP2 preparation keeps a model that is already sharded as it is).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from normsurgery.errors import NormSurgeryError


def fsdp_wanted() -> bool:
    """Whether the launch asks for FSDP (`distributed_type: FSDP` in `accelerate config`, or
    ACCELERATE_USE_FSDP=true); only FSDP version 2 is supported."""
    from accelerate.utils import parse_flag_from_env

    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return False
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise NormSurgeryError(
            f"this accelerate configuration asks for FSDP version {os.environ.get('FSDP_VERSION', '1')}; "
            "normsurgery's fine-tunes shard with FSDP version 2 only. Set `fsdp_version: 2` in `accelerate config` "
            "(or FSDP_VERSION=2 with ACCELERATE_USE_FSDP=true); nothing was written.")
    return True


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard `model` in place over all processes with FSDP2: one unit per decoder block (the classes transformers
    lists in `_no_split_modules`), the rest (embeddings, final norm, unembedding) in the root's. A norm stand-in
    and the readers that compute it sit in the same unit, so its weight is whole when they read it. Every unit,
    the root too (torch would keep the root's gathered), is resharded after each forward: a rewrite that sets a
    parameter between steps (a swap's alpha) must write the shard that the optimizer updates, not a gathered
    copy that the next gather overwrites."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise NormSurgeryError(
            f"{type(model).__name__} does not name its decoder block class (transformers' `_no_split_modules`), "
            "so FSDP cannot shard it block by block. Run it with data parallelism (no FSDP in `accelerate config`); "
            "nothing was written.")
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for block in reversed(blocks):  # inner units before the ones that hold them
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained model's whole state dict: its own, or gathered from the FSDP shards onto the main process's
    CPU. Under FSDP every process must call it (a collective); the others get an empty dict."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
