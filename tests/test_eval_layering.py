"""eval/ sits below the applications: it imports data/, compat and runtime/ of this project, nothing else."""

import ast
from pathlib import Path

import esmfold_peft.eval

EVAL_DIR = Path(esmfold_peft.eval.__file__).parent
ALLOWED = ("esmfold_peft.data", "esmfold_peft.eval", "esmfold_peft.compat", "esmfold_peft.runtime")


def project_imports(path: Path) -> list[str]:
    """Every esmfold_peft module a file imports (relative imports resolved against eval/)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = ["esmfold_peft", "eval"][: 2 - (node.level - 1)]
                module = ".".join(base + ([module] if module else []))
            names += [f"{module}.{a.name}" if module == "esmfold_peft" else module for a in node.names]
    return [n for n in names if n == "esmfold_peft" or n.startswith("esmfold_peft.")]


def test_eval_imports_only_data_compat_and_runtime():
    files = sorted(EVAL_DIR.glob("*.py"))
    assert len(files) >= 6
    wrong = {f"{p.name}: {name}" for p in files for name in project_imports(p)
             if not name.startswith(ALLOWED)}
    assert not wrong, f"eval/ imports outside data/, compat, runtime/: {sorted(wrong)}"


def test_the_check_sees_an_import_of_fold(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from esmfold_peft.fold.train import build_split\nfrom ..fold import validate\n")
    assert project_imports(bad) == ["esmfold_peft.fold.train", "esmfold_peft.fold"]
