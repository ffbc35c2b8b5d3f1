"""Every `s2dit` command on one parser: help, one-line usage errors, exit codes, aliases.

One table (COMMANDS) of every command a user can type: `s2dit generate`, `convert wan`, each
`train ...`, `export coreml` and `info`. Each row's `--help` must work under its `s2dit` name
and name its options; an unknown option must be one `error:` line, exit code 2, nothing
written. `convert` and `train` commands run their module's own parser (`python -m convert.wan`,
`python -m train.*` stay as aliases, checked in subprocesses), and `s2dit --help` imports
neither MLX nor PyTorch.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest
from cli_harness import assert_user_error, run_main, tree_state

from s2dit_mlx import cli
from s2dit_mlx.errors import EXIT_INTERRUPTED

# (command, arguments a parse needs to reach the option check, options its help must name)
COMMANDS = [
    (
        ("generate",),
        ["a fox", "-o", "{tmp}/v.mp4"],
        ["--model", "--output", "--frames", "--seed", "--stream", "--solver", "--allow-large"],
    ),
    (
        ("convert", "wan"),
        ["{tmp}/src", "--out", "{tmp}/out"],
        ["--out", "--dtype", "--quantize", "--group-size", "--only", "--overwrite"],
    ),
    (
        ("train", "dit"),
        ["--out", "{tmp}/run"],
        ["--model", "--config", "--data", "--lora", "--steps", "--resume", "--palette-bits"],
    ),
    (("train", "vae"), ["--out", "{tmp}/run"], ["--arch", "--base-dim", "--steps", "--resume"]),
    (
        ("train", "fuse"),
        ["--model", "{tmp}/m", "--adapter", "{tmp}/a", "--out", "{tmp}/o"],
        ["--model", "--adapter", "--out", "--no-check-base"],
    ),
    (("train", "average"), ["{tmp}/a", "{tmp}/b", "--out", "{tmp}/o"], ["--weights", "--out"]),
    (
        ("train", "default-model"),
        ["--out", "{tmp}/run"],
        ["--init", "--vae", "--steps", "--clip-frames", "--palette-bits"],
    ),
    (
        ("train", "teacher-cache"),
        ["--teacher", "{tmp}/t", "--prompts", "shapes:4", "--out", "{tmp}/c"],
        ["--teacher", "--prompts", "--steps", "--keep", "--shard"],
    ),
    (
        ("train", "dmd"),
        ["--out", "{tmp}/run"],
        ["--generator", "--teacher", "--cache", "--iterations", "--resume"],
    ),
    (
        ("train", "layout-search"),
        ["--teacher", "{tmp}/t", "--cache", "{tmp}/c", "--out", "{tmp}/o"],
        ["--kinds", "--latency", "--memory", "--cost-file"],
    ),
    (
        ("export", "coreml"),
        ["--out", "{tmp}/e"],
        ["--model", "--compress", "--precision", "--window", "--prompt"],
    ),
    (("info",), [], ["--no-gemm", "--kernels"]),
]
IDS = [" ".join(row[0]) for row in COMMANDS]


def _s2dit(argv: list[str]) -> tuple[int, str, str]:
    return run_main(cli.main, argv)


def _parser_options(command: tuple[str, ...]) -> list[str]:
    """Every long option of the parser that really runs `command` (the module's own one)."""
    group = cli.MODULE_COMMANDS.get(command[0])
    if group is not None:
        parser = importlib.import_module(group[command[1]][0]).build_parser()
    else:
        parser = cli.build_parser()
        for name in command:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser = sub.choices[name]
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def test_table_covers_every_command():
    listed = {row[0] for row in COMMANDS}
    modules = {(g, n) for g, names in cli.MODULE_COMMANDS.items() for n in names}
    assert modules <= listed
    assert {("generate",), ("export", "coreml"), ("info",)} <= listed
    assert set(cli.MODULE_COMMANDS["train"]) == {
        "dit",
        "vae",
        "fuse",
        "average",
        "default-model",
        "teacher-cache",
        "dmd",
        "layout-search",
    }


@pytest.mark.parametrize(("command", "needed", "options"), COMMANDS, ids=IDS)
def test_help_names_the_command_and_its_options(command, needed, options):
    code, out, err = _s2dit([*command, "--help"])
    assert code == 0 and err == "", err
    assert out.startswith(f"usage: s2dit {' '.join(command)} "), out.splitlines()[0]
    text = " ".join(out.split())
    for option in options + _parser_options(command):
        assert option in text, f"s2dit {' '.join(command)} --help does not name {option}"


@pytest.mark.parametrize(("command", "needed", "options"), COMMANDS, ids=IDS)
def test_unknown_option_is_one_line_and_exit_2(tmp_path, command, needed, options):
    argv = [*command, *[a.format(tmp=tmp_path) for a in needed], "--no-such-option", "3"]
    before = tree_state(tmp_path)
    code, out, err = _s2dit(argv)
    assert_user_error(code, err, 2, "unrecognized arguments: --no-such-option 3")
    assert err.rstrip().endswith(f"(see s2dit {' '.join(command)} --help)"), err
    assert out == "" and tree_state(tmp_path) == before


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "nope"], "argument COMMAND: invalid choice: 'nope'"),
        (["convert", "nope"], "argument COMMAND: invalid choice: 'nope'"),
        (["export", "tflite"], "argument FORMAT: invalid choice: 'tflite'"),
        (["make-video"], "argument COMMAND: invalid choice: 'make-video'"),
        (["--colour"], "unrecognized arguments: --colour"),
    ],
)
def test_unknown_command_is_one_line_and_exit_2(argv, expected):
    code, out, err = _s2dit(argv)
    assert_user_error(code, err, 2, expected)


@pytest.mark.parametrize(
    ("group", "names"),
    [*((g, list(n)) for g, n in cli.MODULE_COMMANDS.items()), ("export", ["coreml"])],
)
def test_group_lists_its_commands(group, names):
    code, out, _ = _s2dit([group, "--help"])
    assert code == 0 and out.startswith(f"usage: s2dit {group} ")
    assert all(name in out for name in names)
    code, bare, err = _s2dit([group])  # no command: the list, and exit 2
    assert code == 2 and bare == out and err == ""


def test_top_level_help_is_fast_and_imports_no_mlx_or_torch():
    code = (
        "import sys, contextlib, io\n"
        "from s2dit_mlx.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['convert', '--help'], ['--version']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        assert main(argv) == 0, argv\n"
        "    assert out.getvalue(), argv\n"
        "heavy = sorted(m for m in ('mlx', 'mlx.core', 'torch', 'coremltools', 'train', 'convert')"
        " if m in sys.modules)\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_a_module_command_runs_and_reports_through_s2dit(tiny_model_dir, tmp_path):
    """`s2dit train average`: a user error is the module's own line (exit 2), a run exits 0."""
    out = tmp_path / "soup"
    code, _, err = _s2dit(["train", "average", str(tiny_model_dir), "--out", str(out)])
    assert_user_error(code, err, 2, "give two or more model folders")
    assert not out.exists()
    model = str(tiny_model_dir)
    code, _, err = _s2dit(["train", "average", model, model, "--out", str(out)])
    assert code == 0, err
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_ctrl_c_in_a_module_command_exits_130(monkeypatch, tmp_path):
    import train.fuse

    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.fuse, "fuse_cli", interrupted)
    argv = ["--model", "m", "--adapter", "a", "--out", str(tmp_path / "o")]
    code, _, err = _s2dit(["train", "fuse", *argv])
    assert_user_error(code, err, EXIT_INTERRUPTED, "error: interrupted")

    def slow_import(_name):  # Ctrl-C while the module (MLX, ...) is still being imported
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", slow_import)
    code, _, err = _s2dit(["train", "fuse", *argv])
    assert_user_error(code, err, EXIT_INTERRUPTED, "error: interrupted")


ALIASES = sorted(
    module for group in cli.MODULE_COMMANDS.values() for module, _ in group.values()
) + ["s2dit_mlx.cli"]


@pytest.mark.parametrize("module", ALIASES)
def test_python_m_aliases_still_work(module, tmp_path):
    """`python -m train.dit` and friends: the same parser under their own name, exit codes too."""
    prog = "s2dit" if module == "s2dit_mlx.cli" else f"python -m {module}"
    helped = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(f"usage: {prog} "), helped.stdout[:200]
    bad = subprocess.run(
        [sys.executable, "-m", module, "--no-such-option"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert_user_error(bad.returncode, bad.stderr, 2, f"(see {prog} --help)")
    assert list(tmp_path.iterdir()) == []
