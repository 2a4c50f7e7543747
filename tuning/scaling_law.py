"""Scaling-law assist: fit L(N, D) = E + A/N^alpha + B/D^beta to finished trials and say which
model size N (parameters) and token count D minimize the loss for a compute budget C = 6ND.

The fit follows Hoffmann et al. 2022 (Chinchilla, approach 3): a Huber loss (delta 1e-3) on
log-loss residuals, minimized from a grid of starting points, because the objective has many
local minima. Its error is the leave-one-out relative error of the predicted loss: the fit
refitted without each point, predicting it. No torch.distributed, no Ray: plain tensors.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from raylm.fmt import figure, save_figure

MIN_SIZES = 3  # distinct model sizes: with fewer, A/N^alpha cannot be told from E
MIN_TOKENS = 3  # distinct token counts, for B/D^beta likewise


class TooFewPoints(ValueError):
    """The trials cannot pin down the law's 5 parameters; the message says why."""


@dataclass
class Fit:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    points: int
    loo_rel_error: float  # RMS of (predicted - observed) / observed, each point left out in turn

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def optimum(self, flops: float) -> tuple[float, float]:
        """N and D minimizing the loss subject to 6ND = flops (Hoffmann et al., eq. 4)."""
        a, b = self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return g * (flops / 6) ** a, (flops / 6) ** b / g


def fit_law(n: list[float], d: list[float], loss: list[float], min_points: int = 8) -> Fit:
    """Fit the law to (N, D, L) triples; TooFewPoints if they cannot determine it."""
    refuse_thin(n, d, min_points)
    x = torch.tensor([n, d], dtype=torch.float64).log()
    y = torch.tensor(loss, dtype=torch.float64).log()
    theta = best_start(x, y)
    theta = refine(theta, x, y)
    held_out = []
    for i in range(len(loss)):  # leave-one-out, each refit starting from the full fit
        keep = torch.arange(len(loss)) != i
        t = refine(theta.clone(), x[:, keep], y[keep])
        held_out.append(float(predict(t, x[:, i : i + 1]).exp()) / loss[i] - 1)
    a, b, e, alpha, beta = theta.tolist()
    rel = math.sqrt(sum(r * r for r in held_out) / len(held_out))
    return Fit(E=math.exp(e), A=math.exp(a), alpha=alpha, B=math.exp(b), beta=beta, points=len(loss), loo_rel_error=rel)


def refuse_thin(n: list[float], d: list[float], min_points: int) -> None:
    sizes, tokens = len(set(n)), len(set(d))
    if len(n) < min_points:
        raise TooFewPoints(
            f"{len(n)} finished trials; the fit has 5 parameters and needs at least {min_points} "
            "(scaling_law.min_points) to say anything beyond the trials themselves"
        )
    if sizes < MIN_SIZES:
        raise TooFewPoints(
            f"{sizes} distinct model size(s) among the trials; at least {MIN_SIZES} are needed "
            "to separate the size term A/N^alpha from the irreducible loss E (vary model.* in the space)"
        )
    if len({round(math.log10(6 * a * b), 2) for a, b in zip(n, d)}) < 2:
        raise TooFewPoints(
            "every trial used the same compute 6ND, so size and data moved together and their "
            "terms cannot be told apart; vary train.max_steps (or the trial budget) as well"
        )
    if tokens < MIN_TOKENS:
        raise TooFewPoints(
            f"{tokens} distinct token count(s) among the trials; at least {MIN_TOKENS} are needed "
            "to fit the data term B/D^beta (vary the trial budget or train.max_steps)"
        )


def predict(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log L for log N, log D in x (2, P); theta = (log A, log B, log E, alpha, beta), batched
    over leading dimensions."""
    a, b, e, alpha, beta = theta.unbind(-1)
    terms = torch.stack(
        [
            a[..., None] - alpha[..., None] * x[0],
            b[..., None] - beta[..., None] * x[1],
            e[..., None].expand(*e.shape, x.shape[1]),
        ]
    )
    return terms.logsumexp(0)


def objective(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    pred = predict(theta, x)
    return torch.nn.functional.huber_loss(pred, y.expand_as(pred), delta=1e-3, reduction="none").sum(-1)


def best_start(x: torch.Tensor, y: torch.Tensor, steps: int = 1500) -> torch.Tensor:
    """Adam from a grid of 432 starting points at once; the one that ends lowest."""
    grid = torch.tensor(
        list(
            itertools.product(
                [0.0, 5.0, 10.0, 20.0], [0.0, 5.0, 10.0, 20.0], [-1.0, 0.0, 1.0], [0.2, 0.5, 1.0], [0.2, 0.5, 1.0]
            )
        ),
        dtype=torch.float64,
    )
    theta = grid.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        objective(theta, x, y).sum().backward()  # starts are independent: the sum splits
        opt.step()
    with torch.no_grad():
        return theta[objective(theta, x, y).argmin()].detach().clone()


def refine(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    theta = theta.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        value = objective(theta, x, y)
        value.backward()
        return value

    opt.step(closure)
    return theta.detach()


def recommend(fit: Fit, flops: float, largest_trial_flops: float) -> dict:
    """The compute-optimal N and D for `flops`, the loss the fit predicts there, and how far
    beyond the trials that reaches."""
    n, d = fit.optimum(flops)
    return {
        "flops": flops,
        "params": n,
        "tokens": d,
        "tokens_per_param": d / n,
        "predicted_loss": fit.loss(n, d),
        "extrapolation": flops / largest_trial_flops,
        "fit": asdict(fit),
    }


def describe(rec: dict) -> str:
    f = rec["fit"]
    far = f"; {rec['extrapolation']:.0f}x beyond the largest trial's compute" if rec["extrapolation"] > 1 else ""
    return (
        f"for {rec['flops']:.3g} FLOPs: {rec['params']:.3g} parameters on {rec['tokens']:.3g} tokens "
        f"({rec['tokens_per_param']:.1f} tokens/parameter), predicted loss {rec['predicted_loss']:.4f} "
        f"(leave-one-out error {f['loo_rel_error']:.1%} over {f['points']} trials{far}); "
        f"L = {f['E']:.3f} + {f['A']:.3g}/N^{f['alpha']:.3f} + {f['B']:.3g}/D^{f['beta']:.3f}"
    )


def plot_law(fit: Fit, n: list[float], d: list[float], loss: list[float], rec: dict, path: Path) -> None:
    """Observed loss against compute 6ND, the fit's curve for each observed size, and the
    compute-optimal frontier up to the recommended budget."""
    fig, ax = figure((7, 4.5))
    compute = [6 * a * b for a, b in zip(n, d)]
    sc = ax.scatter(compute, loss, c=[math.log10(v) for v in n], cmap="viridis", zorder=3, label="trials")
    fig.colorbar(sc, label="log10 parameters")
    top = max(rec["flops"], max(compute)) * 1.5
    for size in sorted(set(n)):
        grid = [min(compute) / 2 * (top / (min(compute) / 2)) ** (i / 60) for i in range(61)]
        ax.plot(grid, [fit.loss(size, c / (6 * size)) for c in grid], lw=0.8, alpha=0.6)
    frontier = [min(compute) * (top / min(compute)) ** (i / 60) for i in range(61)]
    ax.plot(frontier, [fit.loss(*fit.optimum(c)) for c in frontier], "k--", label="compute-optimal (fit)")
    ax.scatter([rec["flops"]], [rec["predicted_loss"]], marker="*", s=200, c="red", zorder=4, label="recommended")
    ax.set(
        xscale="log",
        xlabel="training compute 6ND (FLOPs)",
        ylabel="validation loss (nats/token)",
        title=f"L = {fit.E:.2f} + {fit.A:.3g}/N^{fit.alpha:.2f} + {fit.B:.3g}/D^{fit.beta:.2f}",
    )
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
