"""
ParallelStyles that PyTorch does not ship, written like the ones in
`torch.distributed.tensor.parallel.style` so that a reader who knows those knows these.
"""

import types

import torch.nn as nn
from torch.distributed.tensor import distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput

from dtensor_gpt.sharding_rules import plain_tensors_replicated, strided_shard


class PackedColwiseParallel(ColwiseParallel):
    """
    Column-parallel Linear whose output packs `groups` equal parts (nanoGPT's fused q|k|v).

    Plain `ColwiseParallel` gives rank 0 the first rows of the packed weight (all of q and
    part of k). Here each of the `groups` parts is sharded on its own, so every rank holds
    q, k and v for the same heads and attention needs no communication. Weight and bias are
    `_StridedShard(0, split_factor=groups)`; the output comes out `_StridedShard` on its last
    dimension and is kept as it is (the model's `split` of it is local; see
    `dtensor_gpt.sharding_rules`).

    Keyword Args:
        groups (int): how many equal parts the output features pack. Default: 3 (q, k, v).
        input_layouts (Placement, optional): the layout of the input. Default: Replicate().
        use_local_output (bool, optional): return the local shard (this rank's q|k|v) instead
            of the DTensor, for a model written for local heads. Default: False: an unchanged
            nanoGPT splits by the global n_embd, which only a DTensor output satisfies.

    Example::
        >>> parallelize_module(model, tp_mesh, {"transformer.h.*.attn.c_attn": PackedColwiseParallel()})
    """

    def __init__(self, *, groups=3, input_layouts=None, use_local_output=False):
        super().__init__(input_layouts=input_layouts, use_local_output=use_local_output)
        self.groups = groups

    def _partition_linear_fn(self, name, module, device_mesh):
        for param_name, param in module.named_parameters():
            dist_param = nn.Parameter(
                distribute_tensor(
                    param, device_mesh, [strided_shard(0, self.groups)], src_data_rank=self.src_data_rank
                ),
                requires_grad=param.requires_grad,
            )
            module.register_parameter(param_name, dist_param)

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        return outputs.to_local() if use_local_output else outputs

    def __repr__(self):
        return f"{type(self).__name__}(groups={self.groups}, input_layouts={self.input_layouts}, use_local_output={self.use_local_output})"

    def _apply(self, module, device_mesh):
        if not isinstance(module, nn.Linear):
            raise ValueError(f"PackedColwiseParallel shards nn.Linear modules, not {type(module).__name__}")
        return super()._apply(module, device_mesh)


class PrepareAttentionInput(PrepareModuleInput):
    """
    `PrepareModuleInput` for an attention module whose plain tensors are replicated.

    With dropout, CPU SDPA takes its math path, a decomposition that builds the causal mask
    as a plain tensor and adds it to the heads-sharded DTensor scores, which DTensor refuses.
    The mask is the same on every rank, so within this module's forward (and only there)
    plain tensors meeting DTensors count as replicated. Inputs are prepared exactly as
    `PrepareModuleInput` does. In eval mode there is no dropout, the fused kernel makes no
    plain tensor and nothing changes; the setting is not even touched, so that torch.compile
    (which cannot trace it) compiles the attention of a decoding step in one graph. The scope
    wraps the module's forward (a `with`), so a forward that raises closes it too: hooks could
    not, as the closing one would have to be `always_call`, whose id dynamo guards on, one per
    block, compiling every block apart.

    Example::
        >>> parallelize_module(model, tp_mesh, {"transformer.h.*.attn": PrepareAttentionInput(
        >>>     input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),))})
    """

    def _apply(self, module, device_mesh):
        super()._apply(module, device_mesh)
        module.forward = types.MethodType(_forward_replicating_plain_tensors, module)
        return module


def _forward_replicating_plain_tensors(module, *args, **kwargs):
    if not (module.training and module.dropout):  # no dropout, no math path
        return type(module).forward(module, *args, **kwargs)
    with plain_tensors_replicated():
        return type(module).forward(module, *args, **kwargs)
