"""Fit a linear head to convergence on cached backbone features: a softmax regression by L-BFGS.

A frozen backbone's features of the whole training set fit in memory (54,000 x 1280 floats is
276 MB), so the head can be solved as the convex problem it is, in about a second, instead of
nudged towards it by a few epochs of minibatch AdamW. Features are standardised for the
solver (it converges in far fewer iterations) and the scaling is folded back into the layer,
so the result is an ordinary ``nn.Linear`` on raw features. The weight decay is chosen on the
cached validation features, from solves on a subsample (the full solve is the costly one). Features
in a mapped file (a photo store's run) are read a chunk at a time, so the solve's memory stays that of
a chunk however many images there are.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2)  # candidates, chosen on validation
MAX_ITERATIONS = 50  # per solve; standardised features converge to within ~0.1 point of val accuracy by then
CHOICE_ROWS = 4096  # the weight decay is chosen on fits to at most this many training rows (cost: 3 small solves)


class Standardised:
    """Features and labels, standardised as they are read, in chunks of ``chunk_rows`` (None: all at once,
    kept): a mapped file of features is read a chunk at a time and never held whole."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, mean, std, chunk_rows: int | None) -> None:
        self.features, self.labels, self.mean, self.std = features, labels, mean, std
        self.kept = None if chunk_rows else (features - mean) / std
        self.chunk_rows = chunk_rows or len(features)

    def __len__(self) -> int:
        return len(self.labels)

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.kept is not None:
            yield self.kept, self.labels
            return
        for start in range(0, len(self), self.chunk_rows):
            stop = start + self.chunk_rows
            chunk = self.features[start:stop] - self.mean  # one chunk-sized copy, standardised in place
            yield chunk.div_(self.std), self.labels[start:stop]

    def accuracy(self, weight: torch.Tensor, bias: torch.Tensor) -> float:
        correct = sum(((x @ weight + bias).argmax(1) == y).sum().item() for x, y in self.chunks())
        return correct / len(self)


def _solve(data: Standardised, classes: int, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise cross-entropy + weight_decay * |W|^2 over ``x @ W + b`` with L-BFGS from zero (the gradient
    summed chunk by chunk, so no chunk's activations outlive its backward)."""
    weight = torch.zeros(data.features.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    solver = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=MAX_ITERATIONS, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        solver.zero_grad()
        loss = weight_decay * weight.square().sum()
        loss.backward()
        for x, y in data.chunks():
            part = F.cross_entropy(x @ weight + bias, y, reduction="sum") / len(data)
            part.backward()
            loss = loss.detach() + part.detach()
        return loss

    solver.step(closure)
    return weight.detach(), bias.detach()


@torch.no_grad()
def fit_linear_head(
    head: nn.Linear, train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor,
    chunk_rows: int | None = None,
) -> dict:  # fmt: skip
    """Set ``head`` to the best (on val) L-BFGS softmax regression of the features; returns what was chosen.
    ``chunk_rows``: read the features that many rows at a time (a mapped file); None: hold them standardised."""
    device, dtype = head.weight.device, head.weight.dtype
    train, val = train.float().cpu(), val.float().cpu()
    train_labels, val_labels = train_labels.cpu(), val_labels.cpu()
    mean, std = train.mean(0), train.std(0) + 1e-6
    full = Standardised(train, train_labels, mean, std, chunk_rows)
    on_val = Standardised(val, val_labels, mean, std, chunk_rows)
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:CHOICE_ROWS]
    sample = Standardised(train[rows], train_labels[rows], mean, std, None)  # a few thousand rows, held
    scores = {}
    for weight_decay in WEIGHT_DECAYS:
        with torch.enable_grad():
            weight, bias = _solve(sample, head.out_features, weight_decay)
        scores[weight_decay] = on_val.accuracy(weight, bias)
    chosen = max(scores, key=scores.get)
    with torch.enable_grad():
        weight, bias = _solve(full, head.out_features, chosen)
    val_acc = on_val.accuracy(weight, bias)
    # logits = ((f - mean) / std) @ W + b = f @ (W / std) + (b - (mean / std) @ W)
    head.weight.copy_((weight / std[:, None]).T.to(device, dtype))
    head.bias.copy_((bias - (mean / std) @ weight).to(device, dtype))
    return {"val_acc": val_acc, "weight_decay": chosen}
