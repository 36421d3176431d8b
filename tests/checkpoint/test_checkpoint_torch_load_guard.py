"""Every ``torch.load`` call in the package, benchmarks and launchers passes ``weights_only=True``
(a pickle from a checkpoint or a downloaded file must not be able to run code)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            yield node


def test_every_torch_load_is_weights_only():
    bad, seen = [], 0
    for folder in ("goat_dist", "benchmarks", "launch"):
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for call in _torch_load_calls(tree):
                seen += 1
                kw = {k.arg: k.value for k in call.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    bad.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert seen >= 1  # the checkpoint store's own weights-only load is found (the scan works)
    assert not bad, f"torch.load without weights_only=True: {bad}"
