"""The ``tokenring`` command as a user meets it: every option explained with its default,
one spelling of a dtype as good as the other, the plan's names and JSON keys, predicted
timelines readable at 64 GPUs, and the bench's printout (names as they are, a line per
method that could not run, a word on every blank column)."""

from __future__ import annotations

import argparse
import io
import json

import pytest
from PIL import Image
from rich.console import Console

import tokenring as tr
from tokenring_bench.cli import build_parser
from tokenring_bench.cli import main as cli_main
from tokenring_bench.plan_cli import USP_NAMING, plot_plan_timelines
from tokenring_bench.plots import MAX_HEIGHT_PX
from tokenring_bench.report import print_results

SPELLINGS = {
    "bfloat16": ("bf16", "bfloat16", "BF16"),
    "float16": ("fp16", "float16"),
    "float32": ("fp32", "float32"),
}
PLAN = ["plan", "--topology", "h100-nvswitch-8", "--gpus", "4", "--seq", "32768",
        "--heads-q", "32", "--heads-kv", "8", "--head-dim", "128", "--causal"]  # fmt: skip


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser by name."""
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_option_of_every_subcommand_has_help_that_says_its_default():
    """Required options say so; every other says what it is when not given."""
    parsers = subcommands()
    assert set(parsers) == {"demo", "bench", "plan", "calibrate"}
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"tokenring {name} {action.option_strings}"
            assert action.help, where
            assert ("(required)" if action.required else "default") in action.help, where
        text = parser.format_help()  # every %(default)s expands
        assert "%(" not in text and "default: None" not in text, name


@pytest.mark.parametrize("command", ["demo", "plan", "calibrate"])
def test_every_dtype_option_takes_the_short_and_the_torch_spelling(command):
    parser = subcommands()[command]
    required = PLAN[1:] if command == "plan" else []
    for canonical, spellings in SPELLINGS.items():
        for spelling in spellings:
            assert parser.parse_args([*required, "--dtype", spelling]).dtype == canonical
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([*required, "--dtype", "fp64"])
    assert exit_info.value.code == 2


def test_plan_takes_every_spelling_of_a_dtype_alike():
    """``tr.plan(dtype=...)``: bf16 / bfloat16 / torch.bfloat16 price the call the same."""
    import torch

    def predicted(dtype) -> list[float]:
        report = tr.plan(topology="h100-nvlink-2", gpus=2, seq=8192, heads_q=8, head_dim=64,
                         dtype=dtype, usp=False)  # fmt: skip
        return [c.predicted_ms for c in report.candidates]

    for canonical, spellings in SPELLINGS.items():
        expected = predicted(getattr(torch, canonical))
        assert all(predicted(s.lower()) == expected for s in spellings), canonical
    assert predicted("bf16") != predicted("fp32")
    with pytest.raises(ValueError, match="'bf16' or 'bfloat16'"):
        predicted("fp64")


def test_plan_names_exposed_communication_alike_in_the_table_and_the_json(capsys):
    """One name, the table's: the JSON says ``exposed_comm_ms`` per candidate and step;
    the table's caption explains the usp-UxR names."""
    assert cli_main([*PLAN, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for c in out["candidates"]:
        assert c["exposed_comm_ms"] >= 0 and "comm_ms" not in c
        assert all("exposed_comm_ms" in s and "comm_ms" not in s for s in c["steps"])
    assert cli_main(PLAN) == 0
    table = " ".join(capsys.readouterr().out.split())
    assert "exposed comm ms" in table and "usp-2x2-ring" in table
    assert " ".join(USP_NAMING.split()) in table
    assert "usp-UxR: Ulysses over U ranks inside each of R groups" in USP_NAMING
    assert "-ring: the pass-KV ring across" in USP_NAMING


@pytest.mark.timeout(300)
def test_predicted_timelines_at_64_gpus_are_readable_and_show_both_passes(tmp_path):
    """``tokenring plan --timeline`` at 64 GPUs with --backward: at most 4,000 px tall, one
    legend of at most 12 entries in distinct colours, each of the four fastest drawn
    for the forward and the backward pass, each panel drawing its slowest rank and a
    typical one and saying which."""
    report = tr.plan(topology="h100-ib", gpus=64, seq=1 << 20, heads_q=32, heads_kv=8,
                     head_dim=128, causal=True, backward=True)  # fmt: skip
    png = tmp_path / "timeline.png"
    fig = plot_plan_timelines(report, str(png))
    width, height = Image.open(png).size
    assert height <= MAX_HEIGHT_PX and width <= 3000, (width, height)
    (legend,) = fig.legends
    colours = [tuple(h.get_facecolor()) for h in legend.legend_handles]
    assert 2 <= len(colours) <= 12 and len(set(colours)) == len(colours)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    for c in report.priced[:4]:
        for pass_ in ("forward", "backward"):
            assert sum(t.startswith(f"{c.name}, {pass_} pass") for t in titles) == 1, titles
    assert len(titles) == 8
    predictions = [(c.name, p) for c in report.priced[:4] for _, p in c.passes]
    for ax, (name, prediction) in zip(fig.axes, predictions):
        labels = [t.get_text() for t in ax.get_yticklabels()]
        drawn = {int(label.split()[1]) for label in labels}
        assert len(drawn) == 2 and "64 ranks; drawn: rank" in ax.get_title()
        slowest = int(next(lb for lb in labels if "(slowest)" in lb).split()[1])
        finish = max(s.end_ms for s in prediction.spans if s.rank == slowest)
        assert finish == max(s.end_ms for s in prediction.spans), name


def test_the_plan_command_draws_the_forward_pass_alone_without_backward(tmp_path):
    png = tmp_path / "timeline.png"
    assert cli_main([*PLAN, "--timeline", str(png)]) == 0
    report = tr.plan(topology="h100-nvswitch-8", gpus=4, seq=32768, heads_q=32, heads_kv=8,
                     head_dim=128, causal=True)  # fmt: skip
    fig = plot_plan_timelines(report, str(tmp_path / "again.png"))
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert len(titles) == 4 and all(", forward pass (predicted)" in t for t in titles)
    assert Image.open(png).size == Image.open(tmp_path / "again.png").size


def record(method: str, status: str = "ok", **fields) -> dict:
    """A bench row as the runner makes it, on CPU (no peak memory)."""
    row = {"case": "llama2-mha", "seq": 256, "pass": "forward", "method": method,
           "status": status, "ms": 1.0, "efficiency": 0.5, "tflops_per_device": 0.01,
           "peak_extra_gb": None, "max_rel_err": 1e-7}  # fmt: skip
    return {**row, **fields}


def printed(records: list[dict], width: int = 120) -> str:
    """What ``tokenring bench`` prints for ``records`` on a console ``width`` wide."""
    console = Console(file=io.StringIO(), width=width, color_system=None)
    print_results(console, records, "tokenring bench on 2 x cpu")
    return console.file.getvalue()


def test_the_bench_prints_names_as_they_are_and_a_line_per_method_that_did_not_run():
    """Brackets in a name are not markup; a method that could not run takes one line
    (not one row per case, nor a wrapped reason); the table keeps the rows that ran."""
    reason = (
        "yunchang is not installed (No module named 'yunchang'; pip install yunchang "
        "(docs/peers.md, 'Installing the peers without internet')); AttnType fa runs "
        "CUDA kernels only (got cpu); dtype float32 not in ['bfloat16', 'float16'] (fa)"
    )
    records = [
        record("ideal (T1/P)", peak_extra_gb=None, max_rel_err=None),
        record("tokenring"),
        record("yunchang-ring[fa]", max_rel_err=2e-7),
        *(record("yunchang-zigzag[fa]", f"skipped: {reason}", seq=s) for s in (256, 512)),
        record("para-attn-ring", "skipped: para-attn is not installed\nsecond line"),
    ]
    text = printed(records)
    lines = text.splitlines()
    assert any("yunchang-ring[fa]" in line and "│ ok" in line for line in lines), text
    assert "skipped" not in text
    start = next(i for i, line in enumerate(lines) if line.startswith("not run here"))
    assert "(3 rows" in lines[start]
    skipped = lines[start + 1 :]
    assert len(skipped) == 2 and all(len(line) <= 120 for line in skipped), skipped
    assert skipped[0].startswith("  yunchang-zigzag[fa] (2 rows): yunchang is not installed")
    assert skipped[1] == "  para-attn-ring (1 row): para-attn is not installed second line"


def test_the_bench_says_why_a_column_is_blank():
    """On CPU the peak-memory column is blank: a footnote says it is CUDA only; the ideal
    row's blanks are explained too; a footnote appears only where a blank does."""
    text = printed([record("ideal (T1/P)", max_rel_err=None), record("tokenring")])
    assert "peak+ GB:" in text and "CUDA only" in text and "ideal (T1/P): the single" in text
    on_gpu = printed([record("tokenring", peak_extra_gb=0.5)])
    assert "peak+ GB:" not in on_gpu and "0.50" in on_gpu


def test_calibrate_refuses_a_max_length_below_two_block_sizes(tmp_path, capsys):
    """The kernel table needs two lengths: said before anything is measured, exit 2."""
    path = tmp_path / "never.json"
    assert cli_main(["calibrate", "--output", str(path), "--max-length", "40"]) == 2
    assert "--max-length 40: the kernel table needs two lengths at least" in capsys.readouterr().out
    assert not path.exists()
