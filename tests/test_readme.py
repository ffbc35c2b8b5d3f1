"""Every command in README.md runs as written (the cheap ones), or is accounted for.

The fenced ```bash blocks of README.md are split into commands (continuation lines joined,
comments dropped, `&&` chains split). Each one is, by the tables below:
- run as written, in-process, in order, in a temporary folder holding the inputs the README
  names (./my-model, models/teacher, ... : tiny random-weight models made here), and must exit
  0 and write what it names with -o / --out; a few long runs get cheaper step counts appended
  (RUN_WITH: argparse keeps the last value, so the README's options are all still parsed);
- or, where running is not possible here (downloads, hours of training), parsed by the
  command's own parser, so every option and value in the README is checked (PARSE_ONLY, each
  with the reason);
- or skipped with its reason: installing packages, the test suite itself (SKIP).
A README command in none of these fails the test, so a new command is never unchecked. The
```python block runs too. Commands in docs/*.md are parsed the same way.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from cli_harness import run_main

from s2dit_mlx import cli
from s2dit_mlx.loading import load_model, save_model
from s2dit_mlx.models.s2dit import ModelArgs, S2DiT

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Command prefixes not run here, and why.
SKIP = {
    "python3 -m venv": "makes a virtual environment and installs from PyPI: the tests run in one",
    "pip install": "installs optional dependencies from PyPI (the test env has them)",
    ".venv/bin/pip install": "installs this package and its dependencies from PyPI",
    ".venv/bin/python -m pytest": "the test suite itself",
    ".venv/bin/ruff": "lint; .ci/run runs it",
}

# Commands whose options are checked by their parser but which do not run here, and why.
PARSE_ONLY = {
    "s2dit convert wan Wan-AI/Wan2.1-T2V-1.3B-Diffusers --out models/wan-1.3b --dtype bf16": (
        "downloads the Wan 1.3B checkpoint from the hub (tests/test_convert.py converts tiny ones)"
    ),
    "s2dit convert wan ./Wan2.1-T2V-14B --out models/wan-14b -q 8": (
        "needs the 14B checkpoint on disk"
    ),
    "s2dit generate 'a cat surfing a wave' --model models/wan-1.3b --dtype bfloat16 -o cat.mp4": (
        "needs the converted 1.3B teacher"
    ),
    "s2dit train vae --out runs/vae --arch wan --base-dim 16 --steps 2000": (
        "2000 VAE steps (tests/test_train.py trains VAEs at a few steps)"
    ),
    "s2dit train default-model --out runs/default": (
        "the built-in model's recipe, about 1 h 30 min (tests/test_default_model.py runs it at a "
        "few steps)"
    ),
}

# Commands run with these options appended (cheaper, or fitting the tiny models; the README's
# own options are still parsed first).
RUN_WITH = {
    "s2dit train dit --model ./my-model --data shapes --out runs/lora --lora --rank 8 "
    "--alpha 16 --steps 500": ["--steps", "2", "--no-progress"],
    "s2dit train dit --model ./my-model --data shapes --out runs/full --mode streaming "
    "--steps 2000 --batch-size 8 --ema 0.999 --checkpoint-every 200": [
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--until",
        "1",  # stops after step 1 with a checkpoint, so the --resume below has work left
        "--no-progress",
    ],
    "s2dit train teacher-cache --teacher models/teacher --prompts prompts.txt --out cache/t "
    "--steps 48 --keep every:12": ["--no-progress"],
    "s2dit train dit --config runs/layout/config.json --init-from models/teacher "
    "--data cache:cache/t --out runs/kd": ["--steps", "2", "--batch-size", "2", "--no-progress"],
    "s2dit train dit --model runs/kd/model --data cache:cache/t --objective ode --ode-steps 4 "
    "--out runs/ode": ["--steps", "2", "--batch-size", "2", "--no-progress"],
    "s2dit train dmd --generator runs/ode/model --teacher models/teacher --cache cache/t "
    "--out runs/dmd": ["--iterations", "2", "--critic-ratio", "2", "--no-progress"],
    "s2dit train layout-search --teacher models/teacher --cache cache/t --out runs/layout "
    "--latency 0.6x": [
        "--fit-steps",
        "2",
        "--latency",
        "1x",  # a tiny model's kinds cost about the same: 0.6x of the dearest is below the cheapest
        "--quiet",
    ],
}

PROMPTS = ["a red circle moving left on a black background", "a blue square growing"]


def fenced(text: str, lang: str) -> list[str]:
    """The bodies of the ```lang blocks of a markdown text."""
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def commands(text: str) -> list[list[str]]:
    """Every shell command of the ```bash blocks, as argv lists, in order."""
    found = []
    for block in fenced(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                found.append(words[:cut])
                words = words[cut + 1 :]
    return found


def _key(argv: list[str]) -> str:
    return shlex.join(argv)


def _skip_reason(argv: list[str]) -> str | None:
    line = _key(argv)
    return next((why for prefix, why in SKIP.items() if line.startswith(prefix)), None)


def _s2dit_args(argv: list[str]) -> list[str]:
    assert Path(argv[0]).name == "s2dit", f"not an s2dit command: {_key(argv)}"
    return argv[1:]


def _parse(args: list[str]) -> None:
    """Parse `s2dit ARGS` with the parser of that command, without running it."""
    group = cli.MODULE_COMMANDS.get(args[0])
    if group is not None:
        module = group[args[1]][0]
        importlib.import_module(module).build_parser().parse_args(args[2:])
    else:
        cli.build_parser().parse_args(args)


def _outputs(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-o", "--output", "--out")]


@pytest.fixture
def readme_world(tmp_path, monkeypatch, tiny_model_dir):
    """A folder with the inputs the README's commands name, as tiny models; cwd is it."""
    shutil.copytree(tiny_model_dir, tmp_path / "my-model")
    tiny = load_model(tiny_model_dir)
    # A teacher with full attention in every layer, as a Wan teacher has.
    args = ModelArgs.from_dict({**tiny.dit.args.to_dict(), "layers": ["full"] * 3})
    mx.random.seed(1)
    teacher = S2DiT(args)
    save_model(tmp_path / "models" / "teacher", teacher, tiny.vae, tiny.text_encoder, tiny.defaults)
    # A few-step student on the teacher's step grid (the cache keeps every 12th of 48 steps).
    defaults = {**tiny.defaults, "solver": "few-step", "steps": 4, "guidance": 1.0}
    save_model(tmp_path / "models" / "student", tiny.dit, tiny.vae, tiny.text_encoder, defaults)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_readme_command_is_run_parsed_or_skipped_with_a_reason(readme_world):
    text = README.read_text(encoding="utf-8")
    found = commands(text)
    assert len(found) >= 20, found
    ran = []
    for argv in found:
        if _skip_reason(argv):
            continue
        args = _s2dit_args(argv)
        key = _key(["s2dit", *args])
        if key in PARSE_ONLY:
            _parse(args)  # a usage error here fails the test with argparse's message
            continue
        code, out, err = run_main(cli.main, args + RUN_WITH.get(key, []))
        assert code == 0, f"{key}\nexit {code}: {err[-2000:]}"
        assert "error:" not in err, err
        for path in _outputs(args):
            assert (readme_world / path).exists(), f"{key} did not write {path}"
        ran.append(key)
    # Every table row is still a README command (no stale rows that cover nothing).
    keys = {_key(["s2dit", *a[1:]]) if Path(a[0]).name == "s2dit" else _key(a) for a in found}
    assert set(PARSE_ONLY) <= keys and set(RUN_WITH) <= keys
    assert len(ran) >= 12, ran


def test_readme_python_example_runs(readme_world):
    (python,) = fenced(README.read_text(encoding="utf-8"), "python")
    namespace: dict = {"__name__": "readme"}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(python, "README.md", "exec"), namespace)
    assert namespace["video"].shape == (33, 64, 64, 3)  # the built-in model's defaults
    lines = printed.getvalue().splitlines()
    assert len(lines) >= 3 and all(line.endswith(", 64, 64, 3)") for line in lines[:-1])
    assert "MB" in lines[-1]  # the estimate's summary


def test_quick_start_test_command_is_what_ci_runs():
    text = README.read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_line = next(line for line in text.splitlines() if "pytest" in line)
    assert test_line in ci.splitlines()
    assert len(text.splitlines()) <= 250


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_s2dit_commands_in_docs_parse(page):
    """Every `s2dit ...` command in docs/ names options its parser knows (nothing is run)."""
    for argv in commands((ROOT / "docs" / page).read_text(encoding="utf-8")):
        if argv and argv[0] == "s2dit":
            _parse(argv[1:])


def test_benchmark_tables_are_what_the_report_renders():
    """README's summary and docs/benchmarks.md's tables come from benchmarks/results/*.json."""
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)

    def block(path: Path) -> str:
        text = path.read_text(encoding="utf-8")
        return text.split(report.START + "\n", 1)[1].split("\n" + report.END, 1)[0]

    assert block(README) == report.summary()
    assert block(ROOT / "docs" / "benchmarks.md") == report.render()
    assert len(report.summary().splitlines()) <= 20  # a summary, not the tables


def test_wan_vs_torch_rows_of_the_process_format_render():
    """benchmarks/wan_vs_torch.py's current JSON (one process per side) has a table and a
    summary row (the committed result may still be of the earlier format)."""
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    row = {
        "seconds": {"torch": 2.0, "mlx_fast": 1.6, "mlx_plain": 6.0},
        "torch_over_mlx_fast": 1.25,
        "torch_over_mlx_fast_range": [1.2, 1.3],
        "torch_over_mlx_plain": 0.33,
        "torch_over_mlx_plain_range": [0.3, 0.35],
        "max_rel_err": {"mlx_fast": 1e-5, "mlx_plain": 1e-5},
    }
    result = {
        "torch": "2.x",
        "diffusers": "0.x",
        "torch_threads": 2,
        "machine": {"cpus": 2},
        "mlx_cpu_kernels": "silu: kernel (...)",
        "dit": {
            "format": "processes",
            "dim": 1536,
            "rounds": 5,
            "sides": {"mlx_fast": {"openblas_threads": 1, "kernel_threads": 2}},
            "rows": [
                {"layers": 2, "tokens": 1560, **row},
                {"layers": 4, "tokens": 4680, **row, "torch_over_mlx_fast": 0.9},
            ],
        },
    }
    table = "\n".join(report.wan_vs_torch_table(result))
    assert "| DiT forward, 4 layers, dim 1536, fp32 | 4680 tokens | 2.00 | 1.60 | 0.90" in table
    assert "1.25 (1.20-1.30) | 6.00 | 0.33 (0.30-0.35)" in table
    assert "silu: kernel" in table
    ((what, figure),) = report.wan_vs_torch_summary(result)
    assert "own process" in what
    assert figure == (
        "torch time / MLX time 0.90-1.25 with the CPU fast path, 0.33 without it "
        "(2-4 layers, 1560-4680 tokens)"
    )
