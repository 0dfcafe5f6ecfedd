"""The library is the library: ``import tokenring`` needs torch alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_tokenring_imports_nothing_beyond_torch():
    """rich, matplotlib, the benchmark package and the model libraries of the
    integrations stay out of ``sys.modules`` (torch may bring numpy)."""
    code = (
        "import sys, tokenring\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('rich', 'matplotlib', 'tokenring_bench', 'hypothesis', 'psutil', 'transformers', "
        "'diffusers')]\n"
        "print(','.join(sorted(bad)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", done.stdout


def test_the_package_requires_torch_alone():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0].split("=")[0] for d in project["dependencies"]] == ["torch"]
    assert {"rich>=13", "matplotlib>=3.7"} <= set(project["optional-dependencies"]["bench"])


def test_the_command_names_the_extra_it_needs_when_it_is_missing():
    """Without rich (simulated by blocking its import), ``tokenring`` says what to install."""
    code = (
        "import sys, importlib.util\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'rich' else real(n, *a)\n"
        "import tokenring_bench\n"
        "sys.exit(tokenring_bench.main(['demo']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert "pip install 'tokenring[bench]'" in done.stderr


def test_the_docs_cite_only_files_that_exist():
    """Every ``docs/...``, ``benchmarks/...``, ``src/...`` or ``tests/...`` path named in
    the README and docs is a file of the repository."""
    import re

    pattern = re.compile(r"\b((?:docs|benchmarks|src|tests)/[\w./-]+\.(?:md|py|sh|json|jsonl|png))")
    missing = []
    docs = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md"]
    for doc in [*docs, *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for path in pattern.findall(text):
            if not (ROOT / path).exists():
                missing.append(f"{doc.name}: {path}")
        if "BENCHMARK.md" in text:
            missing.append(f"{doc.name}: BENCHMARK.md (the protocol is docs/benchmarking.md)")
    assert not missing, missing
