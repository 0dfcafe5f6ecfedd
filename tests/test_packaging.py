"""The library is the library: ``import tokenring`` needs torch alone; it installs as
``tokenring-attention``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "tokenring-attention"


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
    assert "pip install 'tokenring-attention[bench]'" in done.stderr


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


# a pip command's arguments: up to the end of the command (&&, ;, |), a comment, a
# Markdown backquote or prose in parentheses after it
PIP_INSTALL = re.compile(r"pip3?\s+install\b([^\n&;|#`(]*)")
# the bare name as a requirement: not a path (.venv/bin/...), not tokenring-attention
BARE_NAME = re.compile(r"(?<![\w./-])tokenring(?![\w-])")


def wrong_installs(text: str) -> list[str]:
    """Every pip install command in ``text`` that names the distribution ``tokenring``
    (on the package index an unrelated project) instead of tokenring-attention."""
    return [m.group(0) for m in PIP_INSTALL.finditer(text) if BARE_NAME.search(m.group(1))]


@pytest.mark.parametrize(
    "command, wrong",
    [
        ("pip install 'tokenring[bench]'", True),
        ('pip install "tokenring[transformers]"', True),
        ("pip install tokenring", True),
        ("python -m pip install -q tokenring==0.2.0", True),
        ("pip install 'tokenring-attention[bench]'", False),
        ("pip install tokenring-attention", False),
        ("pip install -q torch==2.13.0 -e '.[bench]' && .venv/bin/tokenring demo", False),
        ("pip install yunchang (the tokenring bench peer)", False),
    ],
)
def test_the_install_name_check_tells_the_wrong_name_from_the_right_one(command, wrong):
    assert bool(wrong_installs(command)) is wrong


def test_every_install_command_names_the_tokenring_attention_distribution():
    """README, docs, examples, benchmarks, the sources (error messages) and the tests tell
    a user to install tokenring-attention: the name tokenring on the package index is
    someone else's project; and pyproject names the distribution so."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == DISTRIBUTION
    assert pyproject["project"]["scripts"] == {"tokenring": "tokenring_bench:main"}
    files = [ROOT / "README.md", ROOT / ".ci" / "run"]
    for folder in ("docs", "examples", "benchmarks", "src", "tests"):
        files += [
            f
            for f in sorted((ROOT / folder).rglob("*"))
            if f.suffix in (".md", ".py", ".sh", ".txt", ".toml") and "egg-info" not in str(f)
        ]
    files.remove(Path(__file__).resolve())  # its wrong commands above are on purpose
    assert len(files) > 50  # the scan found the tree
    wrong = [
        f"{f.relative_to(ROOT)}: {cmd}" for f in files for cmd in wrong_installs(f.read_text())
    ]
    assert not wrong, wrong
    assert "`tokenring-attention`" in (ROOT / "README.md").read_text()
