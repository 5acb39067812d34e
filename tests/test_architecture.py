"""The house rules that keep cerebseg readable, checked on the source: the import contract
(layers, no import circle, networks without Nipype; pyproject.toml ``[tool.importlinter]``),
modules of a readable size, no module using another's private names."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'cerebseg'
#: "Keep modules under about 600 lines" (house style)
MAX_LINES = 600
#: compiled extensions, private modules by convention (their public face is a Python module)
COMPILED_MODULES = {'_wmv'}


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which('lint-imports', path=str(Path(sys.executable).parent)) \
        or shutil.which('lint-imports')
    if exe is None:
        pytest.fail('lint-imports (import-linter) is not installed: pip install -e ".[test]"')
    return subprocess.run([exe, '--no-cache'], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_import_contract_is_kept():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '0 broken' in proc.stdout


def test_import_contract_catches_a_circle_and_an_upward_import(tmp_path):
    """The same contract on a copy of the package with an upward import (the inference
    importing a trainer) and a circle (two utilities importing each other) must fail."""
    copy = tmp_path / 'src'
    shutil.copytree(PACKAGE, copy / 'cerebseg',
                    ignore=shutil.ignore_patterns('*.so', '*.c', '__pycache__', 'data'))
    shutil.copy(ROOT / 'pyproject.toml', copy / 'pyproject.toml')
    with open(copy / 'cerebseg/models/inference.py', 'a') as handle:
        handle.write('\nfrom cerebseg.training import augment  # noqa\n')
    with open(copy / 'cerebseg/utils/grid.py', 'a') as handle:
        handle.write('\nfrom cerebseg.utils import registration  # noqa\n')
    code = 'from importlinter.cli import lint_imports_command; lint_imports_command()'
    proc = subprocess.run([sys.executable, '-c', code, '--no-cache'], cwd=copy,
                          capture_output=True, text=True, timeout=300,
                          env={'PYTHONPATH': str(copy), 'PATH': '/usr/bin:/bin'})
    assert proc.returncode != 0
    assert 'cerebseg.models.inference -> cerebseg.training.augment' in proc.stdout
    assert '.registration -> .grid' in proc.stdout


def _modules():
    return sorted(p for p in PACKAGE.rglob('*.py') if '__pycache__' not in p.parts)


def test_modules_are_of_a_readable_size():
    long = {str(p.relative_to(ROOT)): n for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f'split these modules by concern (over {MAX_LINES} lines): {long}'


def test_no_module_imports_private_names_of_another():
    found = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('cerebseg'):
                found += [f'{path.relative_to(ROOT)}: {node.module}.{a.name}'
                          for a in node.names if a.name.startswith('_')
                          and not a.name.startswith('__')
                          and a.name not in COMPILED_MODULES]
    assert not found, f'make these helpers public (two modules share them): {found}'
