"""Structure preservation: learn linear and physical maps with and without exact structure.

Part 1 learns a symmetric linear map f(x) = A x (n = 5 and n = 32) from noisy
samples four ways: a 3-layer ReLU MLP, the same MLP with a homogeneity
penalty, a linear model, and a linear model constrained to symmetric matrices
through ``p4opt.Symmetric``. It reports the a-priori (test) error during
training, the additivity error and the homogeneity error for
lambda in [-10, 10] (``p4opt.checks``).

Part 2 learns one step of a periodic 1-D advection-diffusion scheme
(upwind advection + central diffusion, n = 64 cells) from noisy pairs. The
exact step is a circulant matrix whose columns sum to one: it is
translation-equivariant and conserves mass. Three models: an unconstrained
linear map, one trained with mass and equivariance penalties, and a P4 model
with ``p4opt.Circulant(total=1.0)``. Why that structure: a circulant already
has equal row and column sums (each is the sum of its n coefficients), so
``ZeroSum(dim=0, value=1)`` adds exactly one constraint on top of it,
"coefficients sum to one". Stacking both constraint systems
(``LinearStructure.intersection(Circulant(), ZeroSum(0, 1.0))``) gives the same
set but a dense, highly redundant C (n^2 + n rows, an SVD at registration,
O(n^3) per step); ``Circulant(total=1.0)`` is its closed form (n - 1 numbers,
O(n^2) per step). The script checks that both agree. Each model is rolled out
for 1,000 steps (float64) and the mass drift and rollout error are reported.

    python examples/structure_preservation.py            # small, < 2 min on 2 cores
    python examples/structure_preservation.py --full     # longer training
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import p4opt  # noqa: E402
import p4opt.checks as checks  # noqa: E402

#: Homogeneity errors below this are drawn at it (exact zeros otherwise make a comb).
HOMOGENEITY_FLOOR = 1e-9
LAMBDAS = torch.linspace(-10, 10, 41)


# --------------------------------------------------------------- part 1: f(x) = A x
def mlp(n: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, n))


def linear_models(n: int) -> dict[str, tuple[nn.Module, float]]:
    """Model name -> (model, homogeneity-penalty weight)."""
    width = max(64, 4 * n)
    sym = nn.Linear(n, n, bias=False)
    p4opt.register(sym, "weight", p4opt.Symmetric())
    return {
        "MLP": (mlp(n, width), 0.0),
        "MLP + penalty": (mlp(n, width), 1.0),
        "linear": (nn.Linear(n, n, bias=False), 0.0),
        "P4 Symmetric": (sym, 0.0),
    }


def learn_linear_map(n: int, steps: int, seed: int) -> dict[str, dict[str, object]]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen) / math.sqrt(n)
    a = 0.5 * (a + a.T)
    x_train = torch.randn(max(2 * n, 16), n, generator=gen)
    y_train = x_train @ a.T + 0.05 * torch.randn(x_train.shape, generator=gen)
    x_test = torch.randn(512, n, generator=gen)
    x_pair = torch.randn(512, n, generator=gen)
    y_test = x_test @ a.T
    torch.manual_seed(seed)
    results = {}
    for name, (model, weight) in linear_models(n).items():
        opt = p4opt.P4Optimizer(torch.optim.Adam(model.parameters(), lr=3e-3))
        curve = []
        for step in range(steps):
            loss = (model(x_train) - y_train).square().mean()
            if weight:
                lam = 20 * torch.rand(4, generator=gen) - 10
                loss = loss + weight * checks.homogeneity_error(model, x_train, lam).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step % max(1, steps // 100) == 0 or step == steps - 1:
                with torch.no_grad():
                    err = (model(x_test) - y_test).norm() / y_test.norm()
                curve.append((step, float(err)))
        with torch.no_grad():
            results[name] = {
                "curve": curve,
                "test_error": curve[-1][1],
                "additivity": float(checks.additivity_error(model, x_test, x_pair)),
                "homogeneity": checks.homogeneity_error(model, x_test, LAMBDAS),
            }
    return results


# ------------------------------------------------------- part 2: advection-diffusion
def advection_diffusion_step(n: int, speed: float, nu: float) -> torch.Tensor:
    """One explicit step (upwind advection, central diffusion), periodic; a circulant matrix."""
    dx = 1.0 / n
    dt = 0.4 * min(dx / speed, dx * dx / (2 * nu))
    c, d = speed * dt / dx, nu * dt / dx**2
    eye = torch.eye(n, dtype=torch.float64)
    left = eye.roll(1, dims=0)  # (left @ u)_i = u_{i-1}
    return eye - c * (eye - left) + d * (left.T - 2 * eye + left)


def smooth_states(count: int, n: int, gen: torch.Generator) -> torch.Tensor:
    grid = torch.arange(n, dtype=torch.float64) / n
    k = torch.arange(1, 6, dtype=torch.float64)
    amp = torch.randn(count, 5, 2, generator=gen, dtype=torch.float64) / k[:, None]
    waves = 2 * math.pi * k[:, None] * grid
    states = (amp[..., 0:1] * torch.sin(waves) + amp[..., 1:2] * torch.cos(waves)).sum(1)
    return 1.0 + 0.3 * states


def physical_models(n: int) -> dict[str, nn.Module]:
    models = {name: nn.Linear(n, n, bias=False, dtype=torch.float64)
              for name in ("unconstrained", "penalty", "P4 Circulant(total=1)")}
    with torch.no_grad():
        for model in models.values():
            model.weight.copy_(torch.eye(n))
    p4opt.register(models["P4 Circulant(total=1)"], "weight", p4opt.Circulant(total=1.0))
    return models


def check_intersection_agrees(n: int) -> float:
    """Max gap between Circulant(total=1) and the dense intersection of Circulant and ZeroSum."""
    w = torch.randn(n, n, dtype=torch.float64)
    a, b = (nn.Linear(n, n, bias=False, dtype=torch.float64) for _ in range(2))
    a.weight.data.copy_(w)
    b.weight.data.copy_(w)
    p4opt.register(a, "weight", p4opt.Circulant(total=1.0))
    both = p4opt.LinearStructure.intersection(p4opt.Circulant(), p4opt.ZeroSum(0, 1.0))
    p4opt.register(b, "weight", both)
    return float((a.weight - b.weight).detach().abs().max())


def learn_physics(
    n: int, steps: int, rollout: int, noise: float, seed: int, lr: float = 1e-2
) -> dict[str, dict]:
    gen = torch.Generator().manual_seed(seed)
    step = advection_diffusion_step(n, speed=1.0, nu=0.01)
    u = 1.0 + 0.3 * torch.randn(4 * n, n, generator=gen, dtype=torch.float64)  # all frequencies
    target = u @ step.T + noise * torch.randn(u.shape, generator=gen, dtype=torch.float64)
    u0 = smooth_states(1, n, gen)[0]
    truth = [u0]
    for _ in range(rollout):
        truth.append(step @ truth[-1])
    truth_t = torch.stack(truth)
    torch.manual_seed(seed)
    results = {}
    for name, model in physical_models(n).items():
        opt = p4opt.P4Optimizer(torch.optim.Adam(model.parameters(), lr=lr))
        for _ in range(steps):
            out = model(u)
            loss = (out - target).square().mean()
            if name == "penalty":
                mass = (out.sum(-1) - u.sum(-1)).square().mean() / n
                shift = (model(u.roll(1, -1)) - out.roll(1, -1)).square().mean()
                loss = loss + mass + shift
            loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            states = [u0]
            for _ in range(rollout):
                states.append(model(states[-1]))
            states_t = torch.stack(states)
            mass0 = u0.abs().sum()
            results[name] = {
                "conservation": ((states_t.sum(-1) - u0.sum()).abs() / mass0).tolist(),
                "rollout_error": (
                    (states_t - truth_t).norm(dim=-1) / truth_t.norm(dim=-1)
                ).tolist(),
                "one_step_error": float((model.weight - step).norm() / step.norm()),
            }
    return results


# ------------------------------------------------------------------------- output
def plot_linear(all_results: dict[int, dict], out: Path) -> Path:
    fig, axes = plt.subplots(len(all_results), 3, figsize=(14, 4 * len(all_results)),
                             squeeze=False)
    for row, (n, results) in enumerate(all_results.items()):
        for i, (name, res) in enumerate(results.items()):
            steps, errs = zip(*res["curve"], strict=True)
            style = {"ls": ("-", "--", "-.", ":")[i % 4], "marker": "osD^v"[i % 5], "ms": 4,
                     "label": name}
            every = max(1, len(steps) // 8)
            axes[row, 0].semilogy(steps, errs, markevery=(i * every // 4, every), **style)
            every = max(1, len(LAMBDAS) // 8)  # markers offset: exact curves coincide
            axes[row, 2].semilogy(LAMBDAS, res["homogeneity"].clamp_min(HOMOGENEITY_FLOOR),
                                  markevery=(i * every // 4, every), **style)
        names = list(results)
        axes[row, 1].bar(range(len(names)), [max(results[k]["additivity"], 1e-17) for k in names])
        axes[row, 1].set_yscale("log")
        axes[row, 1].set_xticks(range(len(names)), names, rotation=15)
        axes[row, 0].set(title=f"n = {n}: a-priori (test) error", xlabel="Adam step",
                         ylabel="relative test error")
        axes[row, 1].set(title=f"n = {n}: additivity error", xlabel="model",
                         ylabel="||f(x+y) - f(x) - f(y)|| / ||f(x) + f(y)||")
        axes[row, 2].set(title=f"n = {n}: homogeneity error", xlabel="scale lambda",
                         ylabel="||f(λx) - λf(x)|| / ||λf(x)||, floor 1e-9")
        axes[row, 0].legend()
    fig.tight_layout()
    path = out / "linear_map.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_physics(results: dict[str, dict], out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for i, (name, res) in enumerate(results.items()):
        style = {"ls": ("-", "--", "-.", ":")[i % 4], "label": name}
        axes[0].semilogy([max(v, 1e-17) for v in res["conservation"]], **style)
        axes[1].semilogy(res["rollout_error"], **style)
    axes[0].set(title="mass drift", xlabel="rollout step",
                ylabel="|sum u_t - sum u_0| / sum|u_0| (floor 1e-17)")
    axes[1].set(title="rollout error", xlabel="rollout step", ylabel="||u_t - u_t*|| / ||u_t*||")
    axes[0].legend()
    fig.tight_layout()
    path = out / "advection_diffusion.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="longer training (several minutes)")
    parser.add_argument("--out", type=Path, default=Path("results/structure_preservation"),
                        help="folder for the figures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    steps = 5000 if args.full else 800
    phys_steps = 20000 if args.full else 3000

    linear = {n: learn_linear_map(n, steps, args.seed) for n in (5, 32)}
    print(f"Part 1: learning a symmetric f(x) = A x ({steps} Adam steps, noisy data)")
    print(f"{'n':>3}  {'model':<15}{'test error':>12}{'additivity':>12}"
          f"{'homog. max':>12}{'homog. l=-1':>13}")
    minus_one = int((LAMBDAS + 1).abs().argmin())
    for n, results in linear.items():
        for name, res in results.items():
            h = res["homogeneity"]
            print(f"{n:>3}  {name:<15}{res['test_error']:>12.3e}{res['additivity']:>12.2e}"
                  f"{float(h.max()):>12.2e}{float(h[minus_one]):>13.2e}")

    gap = check_intersection_agrees(16)
    physics = learn_physics(64, phys_steps, rollout=1000, noise=1e-3, seed=args.seed)
    print(f"\nPart 2: periodic advection-diffusion, n = 64, {phys_steps} Adam steps, "
          "1000-step rollout (float64)")
    print(f"Circulant(total=1) vs dense intersection(Circulant, ZeroSum): max gap {gap:.1e}")
    print(f"{'model':<24}{'W error':>10}{'mass drift t=10':>17}{'t=100':>10}{'t=1000':>10}"
          f"{'rollout err t=100':>19}{'t=1000':>10}")
    for name, res in physics.items():
        c, r = res["conservation"], res["rollout_error"]
        print(f"{name:<24}{res['one_step_error']:>10.2e}{c[10]:>17.2e}{c[100]:>10.2e}"
              f"{c[1000]:>10.2e}{r[100]:>19.2e}{r[1000]:>10.2e}")
    paths = [plot_linear(linear, args.out), plot_physics(physics, args.out)]
    print("\nfigures: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
