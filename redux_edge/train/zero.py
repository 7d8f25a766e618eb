"""ZeRO stages over torch.distributed (Rajbhandari et al., 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models"), with torch's own implementations rather than a home-made one:

- stage 0: ``DistributedDataParallel`` and a replicated AdamW (the baseline);
- stage 1: DDP and ``torch.distributed.optim.ZeroRedundancyOptimizer``: each rank holds the AdamW state
  of its partition of the parameters only;
- stage 2: FSDP2 ``fully_shard(reshard_after_forward=False)``: gradients and optimizer state sharded,
  parameters kept gathered from forward to backward;
- stage 3: FSDP2 ``fully_shard``: parameters, gradients and optimizer state all sharded.

``memory`` counts what one rank holds (local shards only), which is what the stages change.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["STAGES", "init_optimizer_state", "memory", "shard", "unwrapped"]

STAGES = (0, 1, 2, 3)


def shard(
    module: nn.Module, stage: int, lr: float, weight_decay: float, blocks: list[nn.Module]
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``(wrapped module, optimizer)``; ``blocks`` are the submodules FSDP shards one by one (layers)."""
    import torch.distributed as dist

    trainable = [p for p in module.parameters() if p.requires_grad]
    if stage in (2, 3):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (dist.get_world_size(),))
        reshard = stage == 3
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            [p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
        )
        return module, optimizer
    from torch.nn.parallel import DistributedDataParallel

    wrapped = DistributedDataParallel(module)
    if stage == 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer = ZeroRedundancyOptimizer(
            trainable, optimizer_class=torch.optim.AdamW, lr=lr, weight_decay=weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    return wrapped, optimizer


def unwrapped(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose state this rank holds (ZeroRedundancyOptimizer wraps the rank's own)."""
    return getattr(optimizer, "optim", optimizer)


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def memory(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Bytes of trainable parameters, gradients and optimizer state that this rank holds."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    state = local_optimizer(optimizer).state
    return {
        "parameter_bytes": sum(_local_bytes(p) for p in trainable),
        "gradient_bytes": sum(_local_bytes(p.grad) for p in trainable if p.grad is not None),
        "optimizer_bytes": sum(
            _local_bytes(value)
            for entry in state.values()
            for value in entry.values()
            if torch.is_tensor(value)
        ),
    }


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors without changing a parameter (a step at learning rate 0 on
    zero gradients), so that a checkpoint can be loaded into them in place."""
    local = local_optimizer(optimizer)
    rates = [group["lr"] for group in local.param_groups]
    for group in local.param_groups:
        group["lr"] = 0.0
        for parameter in group["params"]:
            parameter.grad = torch.zeros_like(parameter)
    local.step()
    for group, rate in zip(local.param_groups, rates, strict=True):
        group["lr"] = rate
        for parameter in group["params"]:
            parameter.grad = None
