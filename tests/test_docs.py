"""The documentation stays true: API pages cover every public name, and its code runs."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch

import p4opt

DOCS = Path(__file__).resolve().parents[1] / "docs"
PUBLIC_MODULES = [
    "p4opt",
    "p4opt.linalg",
    "p4opt.linalg_orthogonal",
    "p4opt.linalg.lowrank",
    "p4opt.linalg.merge",
    "p4opt.linalg.sketch",
    "p4opt.linalg.refine",
    "p4opt.linalg.householder",
    "p4opt.linalg.givens",
    "p4opt.linalg.cayley",
    "p4opt.linalg.metrics",
    "p4opt.linalg.random",
    "p4opt.nn",
    "p4opt.checks",
    "p4opt.studies.baselines",
    "p4opt.studies.tasks",
    "p4opt.studies.types",
    "p4opt.studies.records",
    "p4opt.studies.timing",
    "p4opt.studies.progress",
    "p4opt.studies.report",
    "p4opt.studies.compare",
    "p4opt.studies.bench",
    "p4opt.studies.cli",
    "p4opt.studies.tasks.runner",
    "p4opt.studies.tasks.report",
    "p4opt.datasets",
]


def _api_sources() -> str:
    files = sorted((DOCS / "api").glob("*.rst")) + sorted((DOCS / "api").glob("*.md"))
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


def _import_or_skip(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and name.startswith(err.name):
            pytest.skip(f"{name} does not exist yet")
        raise


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_api_reference_documents_every_public_name(module_name: str) -> None:
    module = _import_or_skip(module_name)
    names = list(getattr(module, "__all__", []))
    assert names, f"{module_name} has no __all__"
    sources = _api_sources()
    automodule = re.search(rf"automodule::\s+{re.escape(module_name)}\s*$", sources, re.M)
    if automodule is None:
        covered: set[str] = set()
    else:
        # automodule documents the names of __all__ that carry documentation (a docstring, or a
        # ``#:`` comment for data), minus ``:exclude-members:``; ``:no-members:`` documents none.
        options = sources[automodule.end() :].split("\n\n")[0]
        excluded = re.search(r":exclude-members:(.*)", options)
        skip = {n.strip() for n in excluded.group(1).split(",")} if excluded else set()
        attr_docs = _attribute_comments(module)
        covered = set() if ":no-members:" in options else {
            n for n in names if n not in skip and _documented(module, n, attr_docs)
        }
    missing = [
        n for n in names
        if n not in covered and not re.search(rf"{re.escape(module_name)}\.{n}\b", sources)
    ]
    assert not missing, f"not in the API reference: {', '.join(missing)}"


def _attribute_comments(module: ModuleType) -> set[str]:
    """Module-level names preceded by a ``#:`` documentation comment (autodoc's convention)."""
    source = inspect.getsource(module)
    return set(re.findall(r"^#:.*\n(?:#:.*\n)*(\w+)\s*[:=]", source, re.M))


def _documented(module: ModuleType, name: str, attr_docs: set[str]) -> bool:
    obj = getattr(module, name)
    if inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj):
        return bool(inspect.getdoc(obj))
    return name in attr_docs


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S)


def test_quickstart_snippet_runs_and_keeps_the_layer_invertible() -> None:
    blocks = _python_blocks(DOCS / "quickstart.md")
    assert len(blocks) == 2
    namespace: dict[str, object] = {"__name__": "quickstart"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile("\n".join(blocks), "quickstart.md", "exec"), namespace)  # noqa: S102
    printed = out.getvalue()
    assert "validation of Linear.weight: ok" in printed
    report = namespace["report"]
    assert report.ok and report.figures["inverse_error"] < 1e-9
    stats = namespace["opt"].stats
    assert stats["steps"] == 300
    merges = stats["merges_accepted"] + stats["merges_partial"] + stats["merges_rejected"]
    assert merges == 300  # the default: a merge after every step
    assert stats["merges_accepted"] >= 270
    # training helped: below the loss of predicting zero
    loss, target = namespace["loss"], namespace["target"]
    assert loss.item() < 0.85 * target.square().mean().item()
    # the printed reconstruction is the inverse of the trained layer
    x, x_back = namespace["x"], namespace["x_back"]
    weight = namespace["model"][0].weight.detach().double()
    cond = torch.linalg.cond(weight).item()  # float32 solve: error ~ eps * cond * |x|
    assert (x_back - x).abs().max().item() < 10 * cond * 1.2e-7 * x.abs().max().item()
    assert abs(namespace["pert"].logabsdet().item() - torch.linalg.slogdet(weight)[1].item()) < 1e-4


# ------------------------------------------------------------------ custom family example
@pytest.fixture(scope="module")
def example() -> ModuleType:
    path = DOCS / "examples" / "positive_diagonal.py"
    spec = importlib.util.spec_from_file_location("positive_diagonal", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _diagonal_layer(example: ModuleType, n: int = 8) -> tuple[torch.nn.Linear, p4opt.Perturbation]:
    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(n, n, bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(n) + 0.1 * torch.randn(n, n, generator=gen))
    return lin, p4opt.register(lin, "weight", example.PositiveDiagonal(seed=0))


def test_custom_example_is_short_and_included_in_the_page(example: ModuleType) -> None:
    path = DOCS / "examples" / "positive_diagonal.py"
    assert len(path.read_text(encoding="utf-8").splitlines()) < 40
    assert "examples/positive_diagonal.py" in (DOCS / "custom.md").read_text(encoding="utf-8")
    assert issubclass(example.PositiveDiagonal, p4opt.Perturbation)


def test_custom_example_trains_and_keeps_its_property(example: ModuleType) -> None:
    lin, pert = _diagonal_layer(example)
    w0 = lin.weight.detach().clone()
    assert torch.equal(w0, torch.diag_embed(w0.diagonal()))  # registration projected
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(256, 8, generator=gen, dtype=torch.float64)
    d = torch.linspace(0.5, 3.0, 8, dtype=torch.float64)
    opt = p4opt.P4Optimizer(torch.optim.Adam(lin.parameters(), lr=0.02))  # family default: 20
    first = None
    for _ in range(200):
        loss = (lin(x) - x * d).square().mean()
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
        w = lin.weight.detach()
        assert torch.equal(w, torch.diag_embed(w.diagonal())) and bool((w.diagonal() > 0).all())
    assert opt.stats["merges_accepted"] == 200 // 20 and opt.stats["merges_rejected"] == 0
    # Adam restarts after every merge, so the fit jitters at the scale of lr in log space
    assert (lin.weight.detach().diagonal() / d - 1).abs().max().item() < 0.03
    assert loss.item() < 1e-3 * first
    report = pert.validate()
    assert report.ok and report.figures == {"off_diagonal": 0.0}


def test_custom_example_merge_keeps_outputs_and_rejects_underflow(example: ModuleType) -> None:
    lin, pert = _diagonal_layer(example)
    with torch.no_grad():
        pert.s.copy_(torch.linspace(-1.0, 1.0, 8))
    before = lin.weight.detach().clone()
    assert pert.merge().accepted
    assert torch.equal(lin.weight.detach(), before) and torch.count_nonzero(pert.s) == 0
    base = pert.base.detach().clone()
    with torch.no_grad():
        pert.s.fill_(-1e4)  # exp underflows to 0: the diagonal would stop being positive
    result = pert.merge()
    assert not result.accepted and result.reason is p4opt.Reason.INFEASIBLE_RESULT
    assert torch.equal(pert.base, base) and torch.count_nonzero(pert.s) == 0


def test_custom_example_refuses_a_nonpositive_diagonal(example: ModuleType) -> None:
    lin = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.tensor([1.0, -2.0, 3.0])))
    with pytest.raises(ValueError, match=r"Linear\.weight must be square with a positive diagonal"):
        p4opt.register(lin, "weight", example.PositiveDiagonal(seed=0))


def test_flows_snippet_runs_and_its_density_is_the_change_of_variables() -> None:
    _import_or_skip("p4opt.nn")
    _import_or_skip("p4opt.datasets")
    (block,) = _python_blocks(DOCS / "flows.md")
    namespace: dict[str, object] = {"__name__": "flows"}
    torch.manual_seed(0)
    exec(compile(block, "flows.md", "exec"), namespace)  # noqa: S102
    flow, base, density, x = (namespace[k] for k in ("flow", "base", "density", "x"))
    assert namespace["opt"].stats["steps"] == 1 and namespace["samples"].shape == (1000, 2)
    with torch.no_grad():
        z, ladj = flow.forward_and_log_det(x)
        expected = base.log_prob(z) + ladj
        assert torch.allclose(density.log_prob(x), expected, atol=1e-5)
        back = flow.inverse(z)
    # 200 float32 layers: rounding, amplified along the chain, dominates the exact inverse
    assert (back - x).abs().median().item() < 1e-3


def _resolve(target: str) -> object:
    """Import ``a.b.c`` as deep as modules go, then follow attributes."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(target)


def test_cross_references_to_p4opt_resolve() -> None:
    # Sphinx only warns about unresolved Python references in nitpicky mode, which the type
    # annotations of torch would flood; check the pages' own references to p4opt instead.
    roles = "class|func|meth|mod|data|attr"
    pattern = re.compile(rf"(?:\{{(?:{roles})\}}`|:(?:{roles}):`)~?(?:[^`<]*<)?(p4opt[\w.]*)>?`")
    pages = [*DOCS.rglob("*.md"), *DOCS.rglob("*.rst")]
    targets = {t for page in pages for t in pattern.findall(page.read_text(encoding="utf-8"))}
    assert len(targets) > 40
    broken = []
    for target in sorted(targets):
        try:
            _resolve(target)
        except (AttributeError, ModuleNotFoundError):
            broken.append(target)
    assert not broken, f"references to missing objects: {', '.join(broken)}"
