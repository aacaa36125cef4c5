"""The Fisher task distance of the authors' follow-up (Le et al., "Fisher Task Distance and its Application in
Neural Architecture Search", IEEE Access 2022), beside the paper's transfer distance: a network's empirical
Fisher diagonal on a task's images, with a head refitted to the task, and the distance of two such diagonals,
(1/sqrt 2) ||sqrt F_A - sqrt F_B|| after normalising each to unit trace, in [0, 1]. prune_transform.py measures
it with DISTANCE = "fisher" or "both"."""
import copy
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import training

def split_head(network):
    """(body, head) of a classifier: the BaseCNN's encoder and head, or a torchvision ResNet without and with fc."""
    if hasattr(network, "encoder"):
        return network.encoder, network.head
    body = copy.deepcopy(network)
    head, body.fc = body.fc, torch.nn.Identity()
    return body, head


def refit_head(body, x, y, num_classes, precision="fp32"):
    """A linear head for the task (x, y) on the frozen features of body: logistic regression by L-BFGS from
    zero weights (deterministic), with a small L2 penalty that keeps separable tasks finite."""
    features = training.predict(body, x, 500, precision).clone()  # out of inference mode, for autograd
    head = torch.nn.Linear(features.shape[1], num_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")
    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), y) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    return head.requires_grad_(False)


def squared_grad_sums(module, a, g):
    """Sum over a chunk of the squared per-sample gradients of a Linear's, Conv2d's or BatchNorm2d's weight
    and bias, in closed form from the layer's inputs a and output gradients g (a sample's weight gradient is
    g_i a_i^T, over the unfolded patches for a convolution; the normalised input times g_i for a BatchNorm)."""
    g = g.float()
    if isinstance(module, torch.nn.Linear):  # never a per-sample copy of the weight
        return dict(weight=g.pow(2).T @ a.float().pow(2), bias=g.pow(2).sum(0))
    if isinstance(module, torch.nn.BatchNorm2d):  # in eval mode: y = weight * x_hat + bias, per channel
        shape = (1, -1, 1, 1)
        x_hat = (a.float() - module.running_mean.view(shape)) / (module.running_var.view(shape) + module.eps).sqrt()
        return dict(weight=(g * x_hat).sum((2, 3)).pow(2).sum(0), bias=g.sum((2, 3)).pow(2).sum(0))
    cols = F.unfold(a.float(), module.kernel_size, module.dilation, module.padding, module.stride)
    weight = torch.bmm(g.flatten(2), cols.transpose(1, 2)).square_().sum(0)
    return dict(weight=weight.view_as(module.weight), bias=g.sum((2, 3)).pow(2).sum(0))


def closed_form(module):
    return isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Conv2d) and module.groups == 1
                                                    and module.padding_mode == "zeros") \
        or (isinstance(module, torch.nn.BatchNorm2d) and module.affine and module.running_mean is not None)


def fisher_diagonal(model, x, y, names=None, chunk=128, precision="fp32"):
    """The diagonal of the empirical Fisher of model's parameters (those in `names`; all by default) on the
    labelled images (x, y): the mean of the squared per-sample gradients of the cross-entropy, `chunk` images
    at a time. Linear, Conv2d and (eval-mode) BatchNorm2d layers sum them in closed form from one batched
    backward pass (each sample's output gradient under the summed loss is its own); any other parameter (a
    grouped convolution's) gets per-sample gradients from torch.func (vmap over grad)."""
    model.eval()
    device = next(model.parameters()).device
    params = {k: v.detach() for k, v in model.named_parameters() if names is None or k in names}
    layers = {n: m for n, m in model.named_modules() if closed_form(m)
              and any(f"{n}.{p}" in params for p in ("weight", "bias"))}
    general = {k: v for k, v in params.items() if k.rsplit(".", 1)[0] not in layers}
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in general}
    buffers = dict(model.named_buffers())
    def loss(p, xi, yi):
        with training.autocast(precision, device):
            out = torch.func.functional_call(model, (p, frozen, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out.float(), yi.unsqueeze(0))
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
    seen = {}  # each layer's (input, output) on the chunk

    def keep(name, inputs, out):
        seen[name] = inputs[0].detach(), out
        return out.clone()  # what flows on: an in-place op after the layer (ReLU, a residual sum) must not alter `out`
    hooks = [m.register_forward_hook(lambda _, inputs, out, n=n: keep(n, inputs, out)) for n, m in layers.items()]
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    try:
        for i in range(0, len(x), chunk):
            xb, yb = x[i:i + chunk].to(device), y[i:i + chunk].to(device)
            if general:
                for k, g in per_sample(general, xb, yb).items():
                    total[k] += g.pow(2).sum(0)
            if layers:
                with training.autocast(precision, device):
                    out = model(xb.requires_grad_(True))  # every layer's output then needs a gradient
                grads = torch.autograd.grad(F.cross_entropy(out.float(), yb, reduction="sum"),
                                            [seen[n][1] for n in layers])
                for (n, module), g in zip(layers.items(), grads):
                    for p, value in squared_grad_sums(module, seen[n][0], g).items():
                        if f"{n}.{p}" in total:
                            total[f"{n}.{p}"] += value
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat([v.flatten() for v in total.values()]) / len(x)


def fisher_distance(a, b):
    """The Fisher task distance of two Fisher diagonals: (1/sqrt 2) ||sqrt A - sqrt B|| after normalising
    each to unit trace; 0 for equal matrices, at most 1."""
    a, b = a.double() / a.sum(), b.double() / b.sum()
    return float(torch.sqrt(0.5 * (a.sqrt() - b.sqrt()).pow(2).sum()))


def task_fisher(network, data, cfg):
    """F of a network for task `data`: its body with a head refitted to the task, on FISHER_SAMPLES training
    images; over FISHER_PARAMS."""
    body, _ = split_head(network)
    x, y = data.train.x[:cfg.FISHER_SAMPLES], data.train.y[:cfg.FISHER_SAMPLES]
    head = refit_head(body, data.train.x[:10 * cfg.FISHER_SAMPLES], data.train.y[:10 * cfg.FISHER_SAMPLES],
                      data.task.num_classes, cfg.PRECISION)
    model = torch.nn.Sequential(body, head.to(next(body.parameters()).device))
    names = None
    if cfg.FISHER_PARAMS == "last":
        weighted = [n.rsplit(".", 1)[0] for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
        names = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in weighted[-2:]}
    return fisher_diagonal(model, x, y, names, precision=cfg.PRECISION)


def own_fisher(target, network, tasks, cfg, device):
    """A unit: F of the target's own network for its task."""
    return task_fisher(network.to(device), tasks[target], cfg)


def fisher_unit(source, target, config, network, tasks, own, cfg, device):
    """A unit: d_F(source -> target) from the source network's F on the target's task and the target's own F."""
    tick = time.perf_counter()
    distance = 0.0 if source == target else fisher_distance(task_fisher(network.to(device), tasks[target], cfg), own)
    return dict(source=source, target=target, config=config, distance=distance, seconds=time.perf_counter() - tick,
                device=str(device))


def agreement(transfer, fisher, k):
    """Per target: Spearman correlation of the two distances over the sources, and the overlap of the k closest."""
    rows = []
    for target in fisher.columns:
        if target not in transfer.columns:
            continue
        sources = [s for s in fisher.index if s != target]
        t = transfer.loc[sources, target].fillna(np.inf)  # an infeasible source ranks last
        f = fisher.loc[sources, target]
        rho = float(t.rank().corr(f.rank()))  # Spearman; NaN when either ranks every source alike
        overlap = len(set(t.nsmallest(k).index) & set(f.nsmallest(k).index))
        rows.append(dict(target=target, spearman=rho, **{f"closest_{k}_overlap": overlap}))
    return pd.DataFrame(rows)
