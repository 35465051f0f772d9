"""The layers hold: checked by import-linter's contracts in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_import_contracts_hold() -> None:
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


def test_extract_side_imports_no_torch() -> None:
    code = (
        "import sys, saige_k8s.cli, saige_k8s.dataset.extract, saige_k8s.spec; "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'kubernetes') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_only_the_api_module_talks_to_the_cluster() -> None:
    """Builders make typed models; controller and CLI go through runners/kubernetes.py (one error policy)."""
    import ast

    api_names = {"BatchV1Api", "CoreV1Api", "Watch", "load_kube_config", "load_incluster_config", "ApiException"}
    offenders = []
    for path in sorted((ROOT / "saige_k8s").rglob("*.py")):
        if path.name == "kubernetes.py" and path.parent.name == "runners":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            imported = isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                ("kubernetes.config", "kubernetes.watch")
            )
            if name in api_names or imported:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
