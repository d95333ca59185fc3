"""Test models whose expert choices cannot flip under bf16 rounding."""
import torch


def decisive_routing(model):
    """Spread the routers' bias correction beyond the sigmoid score range (0, 1), so that every token's choice
    of experts is fixed. bf16 drift then cannot turn a near-tie into another expert (an O(1) change of that
    token's output, legitimately), and the end-to-end error measures the kernels' arithmetic. The choices
    themselves are proved by `localize`, which compares every router's expert ids exactly."""
    for name in list(model.weights):   # V3's sigmoid routers' correction; V4's sqrtsoftplus routers' gate.bias
        if name.endswith(("e_score_correction_bias", ".gate.bias")):
            e = model.weights[name].shape[0]
            model.weights.set(name, 2.0 * torch.randperm(e, generator=torch.Generator().manual_seed(0)).float())
    return model
