"""Training and evaluation shared by the steps: batches, Adam, fit / evaluate, the metrics every table reports
(error, balanced error, AUROC) and the precision forward passes run in (fp32, or bf16 under torch.autocast)."""
import math

import numpy as np
import torch

from configuration import UserError

def batches(n, batch_size, shuffle=False, generator=None, device="cpu"):
    """Index batches over range(n), reshuffled on every call when shuffle is set."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return order.to(device).split(batch_size)


def adam(params, lr, device, **kw):
    """Adam with the fused kernel where this torch has it for the device (same maths, one pass)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, **kw)


@torch.inference_mode()
def predict(model, x, batch_size=1000, precision="fp32"):
    """fp32 outputs of model on x, in evaluation mode, batch by batch; moves x to the model's device."""
    model.eval()
    device = next(model.parameters()).device
    with autocast(precision, device):
        return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(x), batch_size)])


def auroc(scores, labels):
    """Area under the ROC curve of binary scores (ties count half); nan if a class is absent."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2)[inverse]  # average rank of each tie group
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(logits, y):
    """Error %, balanced error % (mean per-class miss rate) and AUROC (macro one-vs-rest)."""
    logits, y = logits.float().cpu(), y.cpu()
    pred = logits.argmax(1)
    classes = torch.unique(y)
    recalls = torch.stack([(pred[y == c] == c).float().mean() for c in classes])
    # scores are log-odds from the logits: softmax probabilities saturate to equal values in float32
    logits = logits.double()
    if logits.shape[1] == 2:
        area = auroc((logits[:, 1] - logits[:, 0]).numpy(), (y == 1).numpy())
    else:
        log_odds = lambda c: logits[:, c] - torch.logsumexp(logits[:, torch.arange(logits.shape[1]) != c], 1)
        area = float(np.mean([auroc(log_odds(c).numpy(), (y == c).numpy()) for c in classes.tolist()]))
    return dict(error=100 * float((pred != y).float().mean()),
                balanced_error=100 * float(1 - recalls.mean()), auroc=area)


PRECISIONS = ("fp32", "bf16")


def autocast(precision, device):
    """The context a forward pass runs in: bf16 through torch.autocast, or fp32 as it is. Weights,
    gradients, optimizer state and losses stay fp32 either way."""
    if precision not in PRECISIONS:
        raise UserError(f"PRECISION={precision!r}: use one of {', '.join(PRECISIONS)}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(model, optimizer, xb, yb, loss_fn, precision="fp32"):
    """Forward (in `precision`), backward and an optimizer step on one batch; returns the loss."""
    with autocast(precision, xb.device):
        out = model(xb)
    loss = loss_fn(out.float(), yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_epoch(model, optimizer, x, y, batch_size, generator, device, loss_fn=None, progress=None,
                step=train_step, precision="fp32"):
    """One shuffled pass over (x, y), a step per batch; returns the mean training loss."""
    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    model.train()
    total, count = torch.zeros((), device=device), 0
    for idx in batches(len(x), batch_size, True, generator):
        xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
        total += step(model, optimizer, xb, yb, loss_fn, precision) * len(idx)
        count += len(idx)
        if progress is not None:
            progress.update(len(idx))
    return float(total) / max(count, 1)


def cosine_step(optimizer, steps):
    """A train_step that then decays the optimizer's lr along a cosine, to 0 after `steps` steps."""
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))

    def step(*args):
        loss = train_step(*args)
        scheduler.step()
        return loss
    return step


def fit(model, train, epochs, batch_size, lr, seed, device, label="training", precision="fp32",
        lr_schedule="constant"):
    """Train model on a split with Adam (lr, constant or decayed along a cosine to 0) for `epochs` shuffled
    passes (order seeded by seed), with a progress bar; returns the mean loss of every epoch."""
    from tqdm import tqdm
    optimizer = adam(model.parameters(), lr, device)
    generator = torch.Generator().manual_seed(seed)
    step = train_step if lr_schedule == "constant" else \
        cosine_step(optimizer, epochs * math.ceil(len(train.x) / batch_size))
    with tqdm(total=epochs * len(train.x), desc=label, unit="img", leave=False, mininterval=1) as bar:
        return [train_epoch(model, optimizer, train.x, train.y, batch_size, generator, device, progress=bar,
                            step=step, precision=precision) for _ in range(epochs)]


def evaluate(model, data, batch_size=1000, splits=("val", "test"), precision="fp32"):
    """Error %, balanced error % and AUROC of model on each split of a TaskData, keyed '<split>_<metric>'."""
    metrics = {}
    for split in splits:
        part = getattr(data, split)
        scores = classification_metrics(predict(model, part.x, batch_size, precision), part.y)
        metrics.update({f"{split}_{k}": v for k, v in scores.items()})
    return metrics

