"""The library is the library: ``import tokenring`` needs torch alone; it installs as
``tokenring-attention``; the README's first example runs as printed."""

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


def readme_block(heading: str, index: int = 0) -> str:
    """The ``index``-th python code block of the README section under ``heading``."""
    section = (ROOT / "README.md").read_text().split(f"\n{heading}\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)[index]


@pytest.mark.timeout(200)
def test_the_readmes_first_example_runs_under_torchrun_on_two_cpu_processes(tmp_path):
    """The first code block of the README's "Use", exactly as printed, under torchrun with
    2 gloo processes: both ranks finish and match attention on the whole sequence."""
    example = tmp_path / "example.py"
    example.write_text(readme_block("## Use"))
    # --standalone: a free port of its own, not 29500 (another launch may hold it)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(example)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # a number, not \S+: the two ranks' lines may come out run together on one line
    found = dict(re.findall(
        r"rank (\d): max \|out - attention on the whole sequence\| = ([0-9.]+e[+-][0-9]+|[0-9.]+)",
        done.stdout))  # fmt: skip
    assert set(found) == {"0", "1"}, done.stdout
    assert all(float(err) <= 1e-5 for err in found.values()), found


def gpu_form_of_the_readme_example() -> str:
    """The README's first example with its GPU lines in place of the CPU ones (from
    ``init_process_group`` to the inputs), as the README tells a GPU user to do."""
    cpu, gpu = readme_block("## Use", 0), readme_block("## Use", 1)
    start = cpu.index('dist.init_process_group("gloo")')
    end = cpu.index("\n", cpu.index("q, k, v = ")) + 1
    return cpu[:start] + gpu + cpu[end:]


def test_the_readmes_gpu_form_takes_the_device_from_local_rank():
    """On several nodes the global rank runs past a node's GPUs: the device is LOCAL_RANK's,
    the backend NCCL; and the GPU lines fit into the example (valid Python)."""
    gpu = readme_block("## Use", 1)
    assert 'torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))' in gpu
    assert 'dist.init_process_group("nccl")' in gpu and "get_rank" not in gpu
    program = gpu_form_of_the_readme_example()
    compile(program, "example_gpu.py", "exec")
    assert "gloo" not in program and 'device="cuda"' in program


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_the_readmes_gpu_form_runs_on_every_local_gpu(tmp_path):
    """The GPU form of the README's example under torchrun, one process per GPU."""
    import torch

    example = tmp_path / "example_gpu.py"
    example.write_text(gpu_form_of_the_readme_example())
    gpus = torch.cuda.device_count()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus),
               str(example)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = re.findall(r"= (\S+)$", done.stdout, re.M)
    # bfloat16 outputs of up to about 5 (the first causal rows copy one value each): a
    # unit in the last place there is 2**-5, and the two results round apart by one or two
    assert len(errors) == gpus and all(float(e) <= 0.1 for e in errors), done.stdout
