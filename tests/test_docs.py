"""Docs that run: every ```python block of README.md and docs/*.md is executed as written, and
every command of README's shell blocks is one the ``bpkit`` parser accepts or one the test
suite or CI runs.

A file's Python blocks run in order in one namespace (as a reader pastes them into one
session), in a fresh temporary directory, with JAX's default settings (not the suite's strict
ones). A block that quotes source lines says so on the line before it,
``<!-- quoted: path/in/repo.py -->``, and every line of it must appear in that file (so the
quote cannot drift from the code); any other fragment says ``<!-- not run: <why> -->``.
"""
from __future__ import annotations

import glob
import os
import re
import shlex

import jax
import pytest

from tests.numerics import user_numerics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO)
                              for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
NOT_RUN = ("<!-- not run:", "<!-- quoted:")


def code_blocks(path: str, lang: str, *, marked: str | None = None
                ) -> list[tuple[int, str, str]]:
    """``[(line number, code, marker line)]`` of the fenced ``lang`` blocks of ``path``: those
    without a ``<!-- not run/quoted: ... -->`` marker on the line before, or with
    ``marked``, only those whose marker starts so."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        text = f.read()
    out = []
    for m in _FENCE.finditer(text):
        if m.group(1) != lang:
            continue
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        if (before.startswith(marked) if marked else not before.startswith(NOT_RUN)):
            out.append((text.count("\n", 0, m.start()) + 1, m.group(2), before))
    return out


@pytest.mark.parametrize("path", [p for p in DOCS if code_blocks(p, "python")])
def test_python_blocks_run_as_written(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    with user_numerics(), jax.numpy_rank_promotion("allow"):  # as a user runs them
        for line, code, _ in code_blocks(path, "python"):
            try:
                exec(compile(code, f"{path}:{line}", "exec"), namespace)
            except Exception as e:
                pytest.fail(f"{path}, the ```python block at line {line}, fails as written: "
                            f"{type(e).__name__}: {e}")


def _code(line: str) -> str:
    return " ".join(line.split("#")[0].split())


@pytest.mark.parametrize("path", DOCS)
def test_quoted_blocks_match_their_source(path):
    for line, code, marker in code_blocks(path, "python", marked="<!-- quoted:"):
        source = marker.removeprefix("<!-- quoted:").removesuffix("-->").strip()
        with open(os.path.join(REPO, source), encoding="utf-8") as f:
            lines = {_code(x) for x in f}
        missing = [x for x in code.splitlines() if _code(x) and _code(x) not in lines]
        assert not missing, f"{path}:{line} quotes lines that {source} does not have: {missing}"


# ----------------------------------------------------------------------------- shell commands

# Every README command that is not a `bpkit` command, and where the suite or CI runs it.
EXERCISED = {
    "pip install -e .": ".ci/run installs the package in fresh virtual environments",
    "pip install -e .[test]": ".ci/run (the test extra)",
    "pytest": ".ci/run runs pytest on both JAX ends",
    "pytest -m slow": "the slow tests; tests/test_docs.py checks the marker exists",
    "pytest -n 0": "pytest's own option (pytest-xdist)",
    "HYPOTHESIS_PROFILE=explore pytest": "tests/conftest.py registers the profile",
    "python scripts/bench.py": "test_readme_scripts_run (slow); bpkit.bench in test_bench.py",
    "python scripts/bench_fused.py": "test_readme_scripts_run (slow)",
    "python scripts/bench_while.py": "test_readme_scripts_run (slow)",
    "python scripts/bench_per_example.py": "test_readme_scripts_run (slow)",
    "pip install -e .[models]": ".ci/run's second leg installs the models extra",
    "python scripts/forgetting.py": "test_readme_scripts_run (slow); the LoRA fine-tune in "
                                    "tests/apps/test_lora_finetune.py",
    "tensorboard --logdir runs": "tests/train/test_look.py reads a logdir with TensorBoard's "
                                 "multiplexer",
}


def shell_commands(path: str) -> list[str]:
    """The commands of ``path``'s ```bash blocks (``$ `` prompts and comments stripped, ``&&``
    chains split, backslash continuations joined) and its inline ``bpkit ...`` commands."""
    cmds = []
    for _, code, _ in code_blocks(path, "bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip().removeprefix("$ ").strip()
            if line and not line.startswith("#"):
                cmds += [c.strip() for c in line.split("&&") if c.strip()]
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        text = f.read()
    prose = _FENCE.sub("", text)  # inline code only outside the fenced blocks
    cmds += [" ".join(c.split()) for c in re.findall(
        r"`((?:(?:bpkit|pytest|python|pip|tensorboard) |[A-Z_]+=[^\s`]+ )[^`]*|pytest)`", prose)]
    return cmds


def _is_placeholder(arg: str) -> bool:
    """``[key=value``, ``...]``, ``[--torch]``: optional syntax, not an argument."""
    return ("..." in arg.replace("RUN_DIR...", "") or arg.startswith("[")
            or (arg.endswith("]") and "[" not in arg))


# What a placeholder stands for when the command is parsed.
EXAMPLES = {"CONFIG": "configs/mnist1d_mlp.yaml", "RUN_DIR": "runs/mnist1d_mlp",
            "RUN_DIR...": "runs/mnist1d_mlp", "COMMAND": "train"}


def test_readme_shell_commands_are_exercised(tmp_path):
    """Each `bpkit` command parses with the real parser, its config files exist and load;
    every other command is in EXERCISED (a new one needs a test or CI step first)."""
    from bpkit import cli
    from bpkit.config import load_config
    from bpkit.sweep import plan as sweep_plan
    unknown = []
    for cmd in shell_commands("README.md"):
        argv = shlex.split(cmd)
        if argv[0] != "bpkit":
            plain = " ".join(a for a in argv if not _is_placeholder(a))
            if not any(plain == k or plain.startswith(k + " ") for k in EXERCISED):
                unknown.append(cmd)
            continue
        argv = [EXAMPLES.get(a, a) for a in argv[1:] if not _is_placeholder(a)]
        if not argv or argv[0] in cli.PASS_THROUGH or argv[0].startswith("-"):
            continue  # `bpkit rules ...`/`bpkit bench ...` parse their own arguments
        try:
            args = cli._parse(argv)
        except SystemExit as e:  # --version and -h print and exit 0
            assert e.code == 0, f"README's `{cmd}` is refused by the parser"
            continue
        config = getattr(args, "config", None)
        if config and args.command == "sweep" and any("," in o for o in args.overrides):
            # every combination of the grid (a placeholder grid, `key=v1,v2,...`, has none)
            sweep_plan(os.path.join(REPO, config), args.overrides, out=str(tmp_path))
        elif config:
            load_config(os.path.join(REPO, config), args.overrides)
    assert not unknown, ("README commands that no test or CI step runs (add one, then list "
                         f"it in EXERCISED): {unknown}")


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["scripts/bench.py", "--models", "mlp", "--repeats", "10"],
                                  ["scripts/bench_fused.py", "--small", "--reps", "1"],
                                  ["scripts/bench_while.py", "--sizes", "20", "--checkpoints",
                                   "4", "--reps", "1"],
                                  ["scripts/bench_per_example.py", "--models", "mlp", "--batch",
                                   "8", "--reps", "1"],
                                  ["scripts/forgetting.py", "--steps", "3", "--eval-batches", "1",
                                   "--l2-pull", "0.1",
                                   "run.steps=3", "run.check_parity=false", "data.context=8",
                                   "data.max_chars=20000", "model.args.d_model=16",
                                   "model.args.n_layers=1", "model.args.n_heads=2"]])
def test_readme_scripts_run(argv, tmp_path):
    """README's benchmark scripts, with the smallest arguments, run to the end."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, os.path.join(REPO, argv[0]), *argv[1:]], cwd=tmp_path,
                       env={**env, "PYTHONPATH": REPO}, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip()
