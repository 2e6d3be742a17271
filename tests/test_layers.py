"""Which package may import which (docs/ARCHITECTURE.md): a lower layer importing a higher one fails here."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The torch backend runs the training side's model code (families, VLM, base loading): the one sdk module
# that may import mmagent.train. Nothing below export may import it.
MAY_IMPORT_TRAIN = {"sdk/backends/torch.py"}


def modules(package: str) -> list[Path]:
    """The package's own files; sdk/cli.py links to the top-level cli.py, which sits above every layer."""
    return [f for f in (ROOT / package).rglob("*.py") if not f.is_symlink()]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", ["sdk", "train"])
def test_nothing_below_export_imports_it(package):
    offenders = {str(f.relative_to(ROOT)): sorted(m for m in imports(f) if m.startswith("mmagent.export"))
                 for f in modules(package)}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_sdk_imports_training_code_only_in_the_torch_backend():
    offenders = {str(f.relative_to(ROOT)): sorted(m for m in imports(f) if m.startswith("mmagent.train"))
                 for f in modules("sdk") if str(f.relative_to(ROOT)) not in MAY_IMPORT_TRAIN}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_edge_runtime_answers_without_torch_or_training_code(bundle, sample_image):
    code = (f"import sys; from mmagent import Agent; a = Agent.load({str(bundle)!r}, backend='edge'); "
            f"a.ask({str(sample_image)!r}, 'is there a circle?', max_new_tokens=4); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft') "
            "or m.startswith(('mmagent.train', 'mmagent.export'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
