"""Layering rules that keep the product's design true."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(pkg: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in (ROOT / pkg).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        out[str(f.relative_to(ROOT))] = names
    return out


def test_medseg_core_never_imports_flower_or_adapters() -> None:
    offenders = {
        f: sorted(n & {"flwr", "client", "server", "simulations"})
        for f, n in _imports("medseg_core").items()
        if n & {"flwr", "client", "server", "simulations"}
    }
    assert offenders == {}


def test_client_and_server_do_not_import_simulations() -> None:
    for pkg in ("client", "server"):
        offenders = {f for f, n in _imports(pkg).items() if "simulations" in n}
        assert offenders == set(), f"{pkg} imports simulations: {offenders}"


def test_no_unpickling_in_product_code() -> None:
    bad = []
    for pkg in ("medseg_core", "client", "server", "simulations"):
        for f in (ROOT / pkg).rglob("*.py"):
            text = f.read_text(encoding="utf-8")
            for needle in ("allow_pickle=True", "weights_only=False", "pickle.load"):
                if needle in text:
                    bad.append(f"{f.name}: {needle}")
    assert bad == []
