"""Every command the docs show is one a test or CI runs, or is marked as an example for other
machines.

The shell blocks (```bash, ```console, ...) of README.md and docs/*.md are read line by line:

- ``python -m fl_ondevice.{simulate,partition,export,deploy} ARGS``: the Hydra config is composed
  with ARGS (each job of a ``-m`` sweep) and validated by the project's own ``parse_config``;
  ``simulate`` and ``deploy`` also build the strategy and the ClientApp mods, as a run does before
  any engine starts. A wrong key or value fails here. Nothing runs.
- ``flwr run ... --run-config "..."``: the overrides are keys of pyproject's run config, and the
  fused run config passes ``from_run_config``, as the ServerApp reads it.
- ``python -m experiments.NAME ARGS``: the module's own argparse accepts ARGS (it is stopped
  right after parsing).
- ``pip install -e ".[X]"``, ``python -m pytest -m M``, ``make T``, ``mkdocs ...``,
  ``bash .ci/run``: the extra, the marker, the target, the config exist (CI runs these).
- A few other commands that a test runs are named with that test in ``RUN_BY_TESTS``, which
  must still contain them.

Anything else must sit in a block marked as an example for other machines: inside an admonition
``!!! example "On other machines"`` (or ``??? example``), or after an
``<!-- example: other machines -->`` line. fl_ondevice commands in such blocks are still composed.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException

from fl_ondevice.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
EXAMPLE_MARKER = "<!-- example: other machines -->"
ENTRY_POINTS = {"simulate": "config", "partition": "config", "export": "config", "deploy": "deploy"}
# Commands a test runs (not through the entry points): leading words -> the test file, which must
# still hold each word as a quoted string.
RUN_BY_TESTS = {
    ("flwr", "federation", "simulation-config"): "tests/test_flwr_run.py",
}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass(frozen=True)
class Command:
    """One command of a shell block: where it is, its words, and whether it is an example."""

    where: str  # README.md:42
    words: tuple[str, ...]
    example: bool

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.words)}"


def shell_blocks(path: Path) -> list[tuple[int, str, list[str], bool]]:
    """The fenced shell blocks of a Markdown file: (first line number, language, lines, example)."""
    blocks = []
    lines = path.read_text().split("\n")
    example_indent: int | None = None  # indentation of the open `!!! example` admonition
    marked = False  # the last non-blank line was EXAMPLE_MARKER
    i = 0
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        if example_indent is not None and line.strip() and indent <= example_indent:
            example_indent = None  # the admonition's body ended
        if re.match(r"^\s*(!!!|\?\?\?\+?)\s+example\b", line):
            example_indent = indent
        fence = re.match(r"^(\s*)(```+|~~~+)\s*([\w-]*)", line)
        if fence:
            close = fence.group(2)
            body, j = [], i + 1
            while j < len(lines) and not lines[j].strip().startswith(close):
                body.append(lines[j][len(fence.group(1)) :])
                j += 1
            language = fence.group(3).lower()
            if language in SHELL:
                blocks.append((i + 2, language, body, example_indent is not None or marked))
            i, marked = j + 1, False
            continue
        if line.strip():
            marked = line.strip() == EXAMPLE_MARKER
        i += 1
    return blocks


def commands(path: Path) -> list[Command]:
    """Every command of ``path``'s shell blocks: continuation lines joined, comments dropped,
    ``a && b`` split in two; in ``console`` blocks only the ``$ `` lines."""
    found = []
    name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    for first, language, body, example in shell_blocks(path):
        logical: list[tuple[int, str]] = []
        pending = ""
        for n, raw in enumerate(body, start=first):
            text = raw
            if language == "console":
                if not (pending or text.startswith("$ ")):
                    continue
                text = text.removeprefix("$ ")
            if text.rstrip().endswith("\\"):
                pending += text.rstrip()[:-1] + " "
                continue
            logical.append((n, pending + text))
            pending = ""
        for n, text in logical:
            words = shlex.split(text, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                found.append(Command(f"{name}:{n}", tuple(words[:cut]), example))
                words = words[cut + 1 :]
    return found


ALL = [c for page in PAGES for c in commands(page)]


def test_the_docs_show_commands_and_mark_examples():
    # The extraction itself: the Quickstart's two commands, and the marked examples, are found.
    readme = [str(c).split(": ", 1)[1] for c in ALL if c.where.startswith("README.md")]
    assert "pip install -e ." in readme and "python -m fl_ondevice.simulate" in readme
    assert "python -m pytest" in readme
    assert any(c.example and c.words[:2] == ("flower-superlink", "--ssl-ca-certfile") for c in ALL)
    assert any(c.example and c.words[:2] == ("ray", "start") for c in ALL)


# --- fl_ondevice's entry points ---------------------------------------------------------------


def _split_env(words: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    env: dict[str, str] = {}
    rest = list(words)
    while rest and re.match(r"^[A-Z_][A-Z0-9_]*=", rest[0]):
        key, value = rest.pop(0).split("=", 1)
        env[key] = value
    return env, rest


def _jobs(args: list[str]) -> list[list[str]]:
    """The override lists ``python -m fl_ondevice.X ARGS`` runs: one, or each job of a sweep."""
    overrides, multirun = [], False
    it = iter(args)
    for arg in it:
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg == "--cfg":
            next(it)  # job / hydra / all: prints the config instead of running
        elif arg.startswith("-"):
            raise AssertionError(f"unknown Hydra flag {arg!r}")
        else:
            overrides.append(arg)
    if not multirun:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def _compose(entry: str, overrides: list[str], out: Path):
    from fl_ondevice.config import Config, DeployConfig

    # `python -m fl_ondevice.deploy` registers its own schema before composing (as it does).
    schema = DeployConfig if entry == "deploy" else Config
    ConfigStore.instance().store(name="schema", node=schema)
    try:
        extra = [] if any(o.startswith("output_dir=") for o in overrides) else [f"output_dir={out}"]
        return compose(ENTRY_POINTS[entry], overrides=[*overrides, *extra])
    finally:
        ConfigStore.instance().store(name="schema", node=Config)


def check_entry_point(command: Command, out: Path) -> None:
    """Compose and validate ``python -m fl_ondevice.X ARGS`` as that entry point would."""
    from fl_ondevice.config import parse_config
    from fl_ondevice.deploy import parse_deploy
    from fl_ondevice.server.strategy import make_strategy
    from fl_ondevice.wire.mods import client_mods

    env, words = _split_env(command.words)
    entry = words[2].removeprefix("fl_ondevice.")
    paths = [str(ROOT / p) for p in env.get("PYTHONPATH", "").split(":") if p]
    sys.path[:0] = paths
    try:
        for job in _jobs(words[3:]):
            dcfg = _compose(entry, job, out)
            cfg = parse_deploy(dcfg)[0] if entry == "deploy" else parse_config(dcfg)
            if entry in ("simulate", "deploy"):
                make_strategy(cfg)
                client_mods(cfg)
    finally:
        del sys.path[: len(paths)]


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    """Hydra initialised once for the module's compositions (each costs a config-dir scan)."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        yield


ENTRY = [c for c in ALL if _split_env(c.words)[1][:2] == ["python", "-m"]]
ENTRY = [c for c in ENTRY if _split_env(c.words)[1][2].startswith("fl_ondevice.")]


@pytest.mark.parametrize("command", ENTRY, ids=str)
def test_every_fl_ondevice_command_composes_and_validates(command, tmp_path):
    check_entry_point(command, tmp_path)


@pytest.mark.parametrize(
    ("args", "error", "named"),
    [
        ("client.local_epoch=5", ConfigCompositionException, "client.local_epoch"),  # no such key
        ("num_clients=0", ConfigError, "num_clients=0"),  # a value the dataclass rejects
        ("strategy=fedprox +strategy.proximal_m=0.1", ConfigError, "proximal_m"),  # FedProx's args
        ("-m model=mlp,cnm", ConfigCompositionException, "cnm"),  # one job of a sweep
    ],
)
def test_a_doc_command_with_a_wrong_key_or_value_fails(args, error, named, tmp_path):
    words = ("python", "-m", "fl_ondevice.simulate", *args.split())

    with pytest.raises(error) as err:
        check_entry_point(Command("test", words, False), tmp_path)

    assert named in str(err.value)


def test_only_marked_blocks_may_hold_unchecked_commands(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\nray start --head\n```\n\n"
        '!!! example "On other machines"\n\n    ```bash\n    ray start --head\n    ```\n\n'
        f"{EXAMPLE_MARKER}\n```bash\nray start --head  # a comment\n```\n"
    )

    plain, admonition, marked = commands(page)

    assert plain.words == admonition.words == marked.words == ("ray", "start", "--head")
    assert (plain.example, admonition.example, marked.example) == (False, True, True)
    with pytest.raises(AssertionError, match="neither checked nor run"):
        check_other(plain, monkeypatch)
    check_other(admonition, monkeypatch)


# --- everything else --------------------------------------------------------------------------


class _Parsed(Exception):
    """Raised by the patched ``parse_args`` once the arguments parsed: nothing runs after it."""


def check_experiments_module(words: list[str], monkeypatch) -> None:
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [words[2], *words[3:]])
    saved = dict(os.environ)  # the modules set thread counts for their own process
    try:
        with pytest.raises(_Parsed):
            runpy.run_module(words[2], run_name="__main__", alter_sys=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def check_flwr_run(words: list[str]) -> None:
    from flwr.common.config import flatten_dict, parse_config_args

    from fl_ondevice.config import from_run_config

    defaults = flatten_dict(PYPROJECT["tool"]["flwr"]["app"]["config"])
    override = parse_config_args([words[words.index("--run-config") + 1]])
    unknown = sorted(set(override) - set(defaults))
    assert not unknown, f"--run-config keys {unknown} are not in pyproject's run config"
    from_run_config({**defaults, **override})


def check_other(command: Command, monkeypatch) -> None:
    """A command that is not an fl_ondevice entry point: CI's, a test's, or an example."""
    env, words = _split_env(command.words)
    head = tuple(words[:3])
    if words[:2] == ["pip", "install"]:
        extras = re.findall(r"\[([\w,-]+)\]", " ".join(words))
        known = set(PYPROJECT["project"]["optional-dependencies"])
        for extra in ",".join(extras).split(",") if extras else []:
            assert extra in known, f"no extra {extra!r} in pyproject.toml"
    elif words[:3] == ["python", "-m", "pytest"]:
        markers = {m.split(":")[0] for m in PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]}
        args = words[3:]
        if "-m" in args:
            used = set(re.findall(r"\w+", args[args.index("-m") + 1])) - {"not", "and", "or"}
            assert used <= markers, f"unknown pytest markers {used - markers}"
    elif words[:2] == ["python", "-m"] and words[2].startswith("experiments."):
        check_experiments_module(words, monkeypatch)
    elif words[:1] == ["make"]:
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
        assert set(words[1:]) <= targets, f"no make target {set(words[1:]) - targets}"
    elif words[:1] == ["mkdocs"]:
        assert words[1] in ("build", "serve") and (ROOT / "mkdocs.yml").is_file()
    elif words[:2] == ["bash", ".ci/run"]:
        assert (ROOT / ".ci/run").is_file()
    elif words[:1] == ["export"]:
        assert all(re.match(r"^[A-Z_][A-Z0-9_]*=", w) for w in words[1:])
    elif words[:2] == ["flwr", "run"] and "--run-config" in words:
        check_flwr_run(words)
    elif head in RUN_BY_TESTS:
        text = (ROOT / RUN_BY_TESTS[head]).read_text()
        assert all(f'"{w}"' in text for w in head), f"{RUN_BY_TESTS[head]} no longer runs it"
    elif not command.example:
        raise AssertionError(
            f"{command}: neither checked nor run by a test or CI; put it in a block marked "
            f'`!!! example "On other machines"` or check it in tests/test_docs.py'
        )


OTHER = [c for c in ALL if c not in ENTRY]


@pytest.mark.parametrize("command", OTHER, ids=str)
def test_every_other_command_is_run_by_ci_or_a_test_or_is_an_example(command, monkeypatch):
    check_other(command, monkeypatch)
