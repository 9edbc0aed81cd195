"""Parameter-importance estimators in pure PyTorch: Fisher (EWC), SI, MAS.

Per-sample quantities use ``torch.func`` (``vmap`` over ``grad`` of a
``functional_call``), so the Fisher diagonal is the mean of *per-sample* squared
gradients, as its definition requires. Avalanche's EWC squares the gradient of a
whole minibatch's mean loss instead, which is a different (biased, batch-size
dependent) quantity: E[g]^2 rather than E[g^2].

Batches are ``(x, y)`` or ``(x, y, task_labels)``. With task labels the model is
called as ``model(x, task_id)`` once per task in the batch (Avalanche's multi-head
``MultiTaskModule`` convention), since per-sample ``vmap`` cannot trace the
data-dependent routing of a mixed-task batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from engram import distributed
from engram.stateful import PersistentFields

Batch = tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
FisherEstimator = Literal["empirical", "true"]


def trainable_params(model: nn.Module) -> dict[str, Tensor]:
    """Detached views of the parameters that require grad, by name."""
    return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}


def _task_groups(batch: Batch) -> list[tuple[Tensor, Tensor, int | None]]:
    if len(batch) == 2:
        x, y = batch
        return [(x, y, None)]
    x, y, t = batch
    return [(x[t == task], y[t == task], int(task)) for task in torch.unique(t).tolist()]


def per_sample_grads(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    loss_fn: LossFn,
    task: int | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """Gradient of ``loss_fn(model(x_i), target_i)`` for every sample i.

    Args:
        names: the trainable parameters to differentiate (default: all of them).

    Returns:
        name -> tensor of shape ``(B, *param.shape)``.
    """
    params = trainable_params(model)
    if names is not None:
        params = {k: params[k] for k in names}
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    extra = () if task is None else (task,)

    def sample_loss(p: dict[str, Tensor], xi: Tensor, ti: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0), *extra))
        return loss_fn(out, ti.unsqueeze(0))

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, target)


def _outputs(model: nn.Module, x: Tensor, task: int | None) -> Tensor:
    return model(x) if task is None else model(x, task)


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    estimator: FisherEstimator = "empirical",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Diagonal of the Fisher information, averaged over every sample of ``batches``.

    Args:
        model: a classifier returning logits; evaluated in eval mode (no dropout, frozen
            batch-norm statistics), then restored to its previous mode.
        batches: ``(x, y)`` or ``(x, y, task_labels)`` minibatches.
        estimator: ``"empirical"`` uses the dataset labels; ``"true"`` samples each label
            from the model's own predictive distribution (the Fisher's definition).
        generator: the random stream for ``"true"`` label sampling (persist it to resume).

    Returns:
        name -> mean over samples of the squared per-sample log-likelihood gradient.
    """
    if estimator not in ("empirical", "true"):
        raise ValueError(f"estimator must be 'empirical' or 'true', not {estimator!r}")

    def targets(logits: Tensor, y: Tensor) -> Tensor:
        if estimator == "empirical":
            return y
        probs = F.softmax(logits, dim=-1)  # (B, C)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)

    def summed(out: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(out, target, reduction="sum")

    return _mean_per_sample(
        model, batches, targets, F.cross_entropy, summed, torch.square, "a Fisher"
    )


def mas_importance(model: nn.Module, batches: Iterable[Batch]) -> dict[str, Tensor]:
    """MAS importance: mean over samples of |d ||f(x_i)||_2^2 / d theta| (Aljundi et al. 2018).

    Per sample, like the paper; Avalanche's MAS takes the gradient of a batch's mean
    norm instead.
    """

    def squared_norm(out: Tensor, _: Tensor) -> Tensor:
        return out.pow(2).sum()  # of a batch: the sum of its samples' squared norms

    return _mean_per_sample(
        model,
        batches,
        lambda out, y: y,
        squared_norm,
        squared_norm,
        torch.abs,
        "MAS importance",
    )


def _mean_per_sample(
    model: nn.Module,
    batches: Iterable[Batch],
    targets: Callable[[Tensor, Tensor], Tensor],
    loss_fn: LossFn,
    summed_loss: LossFn,
    transform: Callable[[Tensor], Tensor],
    what: str,
) -> dict[str, Tensor]:
    """Mean over all samples of ``transform(per-sample gradient of loss_fn)``, in eval mode.

    ``targets(logits, y)`` gives the targets of ``loss_fn``; ``summed_loss`` is the sum
    over a batch of ``loss_fn`` per sample; ``transform`` must be multiplicative
    (``transform(a * b) == transform(a) * transform(b)``: square, abs) for the
    closed form of :func:`_linear_sums`.
    """
    was_training = model.training
    model.eval()
    total = {k: torch.zeros_like(p) for k, p in trainable_params(model).items()}
    count = 0
    try:
        for batch in batches:
            for x, y, task in _task_groups(batch):
                if not len(x):
                    continue
                sums, rest = _linear_sums(model, x, y, task, targets, summed_loss, transform)
                for name, value in sums.items():
                    total[name] += value
                if rest:
                    target = rest.pop("__target__")
                    grads = per_sample_grads(model, x, target, loss_fn, task, names=rest)
                    for name, g in grads.items():
                        total[name] += transform(g).sum(dim=0)
                count += len(x)
    finally:
        model.train(was_training)
    # Data-parallel: each rank saw its shard; the sums (exact for counts) make every
    # rank's importance the same, the mean over the whole dataset.
    world = distributed.world()
    if world.size > 1:
        from engram.distributed.reduce import sum_counts, sum_tensors

        sum_tensors(total, world)
        (count,) = sum_counts([count], world)
    if count == 0:
        raise ValueError(f"cannot estimate {what} from an empty dataset")
    return {name: value / count for name, value in total.items()}


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _linear_sums(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    task: int | None,
    targets: Callable[[Tensor, Tensor], Tensor],
    summed_loss: LossFn,
    transform: Callable[[Tensor], Tensor],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Sums over the batch of ``transform`` of per-sample gradients, for ``nn.Linear``s.

    Sample i's gradient of a linear layer's weight is the outer product
    ``delta_i a_i^T`` of the gradient at the layer's output and its input; for a
    multiplicative ``transform``, ``sum_i transform(delta_i a_i^T) =
    transform(delta)^T transform(a)``: one forward with hooks, one backward of the
    batch's summed loss (each sample's output gradient is then its own), two matmuls.
    (Long because the hooks, the one backward and the fallback conditions share the
    per-layer records; split, they would pass them around.)
    A layer called more than once, fed other than ``(batch, features)``, or whose
    parameters are also used outside its own call (shared, tied) is left to the
    per-sample ``vmap`` path, as are all other parameterised modules.

    Returns:
        (name -> sum, for the parameters done here; the other trainable parameter names
        -> None, plus ``"__target__"``: the targets, when there are any such names).
    """
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    owner: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for local, p in module.named_parameters(recurse=False):
            owner.setdefault(id(p), []).append((module, local))
    linears: dict[int, nn.Module] = {}
    for p in params.values():
        owners = owner[id(p)]
        if len(owners) == 1 and _is_plain_linear(owners[0][0]):
            linears[id(owners[0][0])] = owners[0][0]
    calls: dict[int, list[tuple[Tensor, Tensor]]] = {id(m): [] for m in linears.values()}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        calls[id(module)].append((inputs[0].detach(), output))
        return output.clone()  # an in-place op downstream must not change `output`

    handles = [m.register_forward_hook(hook) for m in linears.values()]
    try:
        out = _outputs(model, x, task)
    finally:
        for h in handles:
            h.remove()
    target = targets(out.detach(), y)
    loss = summed_loss(out, target)
    uses = _parameter_uses(loss)
    n = len(x)
    fast: dict[int, tuple[Tensor, Tensor]] = {}
    for key, module in linears.items():
        if len(calls[key]) != 1:
            continue  # never called (no gradient: zero) or called more than once
        a, z = calls[key][0]
        if a.dim() != 2 or a.shape[0] != n or z.shape[0] != n:
            continue
        if any(uses.get(id(p)) != 1 for p in module.parameters(recurse=False) if p.requires_grad):
            continue
        fast[key] = (a, z)
    by_id = {id(p): k for k, p in params.items()}
    result: dict[str, Tensor] = {}
    if fast:
        keys = list(fast)
        deltas = torch.autograd.grad(loss, [fast[k][1] for k in keys])
        for key, delta in zip(keys, deltas, strict=True):
            a, d = transform(fast[key][0]), transform(delta.detach())
            for local, p in linears[key].named_parameters(recurse=False):
                if p.requires_grad:
                    value = d.T @ a if local == "weight" else d.sum(dim=0)
                    result[by_id[id(p)]] = value.reshape(p.shape)
    for key, module in linears.items():
        if not calls[key]:  # never called: no gradient, unless used outside its call
            for p in module.parameters(recurse=False):
                if p.requires_grad and id(p) not in uses:
                    result[by_id[id(p)]] = torch.zeros_like(p)
    rest: dict[str, Any] = {k: None for k in params if k not in result}
    if rest:
        rest["__target__"] = target
    return result, rest


def _parameter_uses(root: Tensor) -> dict[int, int]:
    """id(leaf tensor) -> how many edges of ``root``'s autograd graph lead to it."""
    uses: dict[int, int] = {}
    seen: set[Any] = set()
    stack = [root.grad_fn] if root.grad_fn is not None else []
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            variable = getattr(nxt, "variable", None)
            if variable is not None:  # AccumulateGrad: a leaf
                uses[id(variable)] = uses.get(id(variable), 0) + 1
            elif nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return uses


class SynapticIntelligence(PersistentFields):
    """SI's path integral (Zenke et al. 2017), independent of any training framework.

    Call :meth:`begin` once before training, :meth:`before_step` after
    ``loss.backward()`` and before ``optimizer.step()``, :meth:`after_step` after it,
    and :meth:`consolidate` at the end of each task. The gradient used is the one the
    optimizer follows (that of the total, regularized loss), as in the reference
    implementations.

    Per parameter i, over a task: omega_i = sum_k -g_i(k) * (theta_i(k+1) - theta_i(k)),
    then importance_i += omega_i / ((theta_i(end) - theta_i(start))^2 + xi).
    """

    persistent_fields = ("xi", "omega", "importance", "anchors")

    def __init__(self, xi: float = 0.1) -> None:
        self.xi = xi
        self.omega: dict[str, Tensor] = {}
        self.importance: dict[str, Tensor] = {}
        self.anchors: dict[str, Tensor] = {}  # theta at the start of the current task
        self._before: dict[str, Tensor] = {}
        self._grads: dict[str, Tensor] = {}

    def begin(self, model: nn.Module) -> None:
        """Start accounting (no-op when a restored state already started it)."""
        params = trainable_params(model)
        if not self.anchors:
            self.anchors = {k: p.clone() for k, p in params.items()}
        for k, p in params.items():
            self.omega.setdefault(k, torch.zeros_like(p))
            self.importance.setdefault(k, torch.zeros_like(p))

    def before_step(self, model: nn.Module) -> None:
        self._before = {k: p.clone() for k, p in trainable_params(model).items()}
        self._grads = {
            k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for k, p in model.named_parameters()
            if p.requires_grad
        }

    def after_step(self, model: nn.Module) -> None:
        for k, p in trainable_params(model).items():
            self.omega[k] -= self._grads[k] * (p - self._before[k])
        self._before, self._grads = {}, {}

    def consolidate(self, model: nn.Module) -> None:
        """End of task: fold the path integral into the importance; re-anchor."""
        for k, p in trainable_params(model).items():
            delta = p - self.anchors[k]
            self.importance[k] += self.omega[k] / (delta.pow(2) + self.xi)
            self.omega[k] = torch.zeros_like(p)
            self.anchors[k] = p.clone()

    def penalty(self, model: nn.Module) -> Tensor:
        """sum_i importance_i * (theta_i - anchor_i)^2 (without the strength c)."""
        return quadratic_penalty(model, self.anchors, self.importance)


def quadratic_penalty(
    model: nn.Module, anchors: dict[str, Tensor], importance: dict[str, Tensor]
) -> Tensor:
    """sum over named parameters of importance * (theta - anchor)^2, differentiable in theta."""
    total = torch.zeros(())
    for name, p in model.named_parameters():
        if name in importance:
            total = total + (importance[name] * (p - anchors[name]).pow(2)).sum()
    return total
