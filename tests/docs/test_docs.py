"""Every doc checked against the code: README.md, docs/*.md, docker/README.md and the examples'
READMEs.

- Python snippets run. A snippet that calls a server (it names ``localhost:50051``) runs in a
  subprocess against a real ``tensorline serve`` on an ephemeral port, in a directory holding
  the README's manifest as ``pipeline.yaml``; a snippet that defines nodes is loaded by that
  server as a node module (``--node-module``, from its working directory, as the README says)
  and each node is then checked by what the doc says it does (``NODE_CHECKS``). A snippet that
  cannot run says so and why in a ``<!-- not-run: REASON -->`` line right before its fence;
  nothing is skipped silently.
- Manifests (JSON/YAML blocks with ``nodes``) compile against the built-in catalogue.
- Every ``TENSORLINE_*`` name is a setting (or one of the few other variables, each checked
  where it is read), and the README's configuration table lists every setting with its default.
- Every ``tensorline COMMAND --option`` exists in the CLI, and every CLI environment variable is
  documented.
- Every relative link and every repository path in code spans points at a file that exists, and
  every ``#anchor`` at a heading of the target.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer.core
import typer.main
import yaml

from tensorline.client import Client, Json
from tensorline.client.cli import app
from tensorline.server import Settings
from tensorline.server.manifest import compile_manifest
from tensorline.server.nodes import Node, NodeRegistry, NodeTraits
from tensorline.server.selector import HEAVY_LIBRARIES, Selector
from tests.support.processes import REPO_ROOT, ServerProcess

DOCS = sorted([REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md"),
               *(REPO_ROOT / "docker").glob("README*.md"),
               *(REPO_ROOT / "examples").glob("*/README*.md")])
DOC_TARGET = "localhost:50051"
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>.*?)\s*-->")


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    lang: str
    code: str
    not_run: str | None  # the reason given in a <!-- not-run: ... --> line before the fence

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO_ROOT)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    found: list[Block] = []
    lines = doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)", lines[i])
        if fence is None:
            i += 1
            continue
        start = i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.search(before)
        found.append(Block(doc, start + 1, fence.group(1), "\n".join(body) + "\n",
                           marker.group("reason") if marker else None))
        i += 1
    return found


ALL_BLOCKS = [block for doc in DOCS for block in blocks(doc)]
PYTHON = [b for b in ALL_BLOCKS if b.lang == "python"]
CLIENT_SNIPPETS = [b for b in PYTHON if b.not_run is None and DOC_TARGET in b.code]
NODE_SNIPPETS = [b for b in PYTHON if b.not_run is None and DOC_TARGET not in b.code
                 and "from tensorline.server.nodes import" in b.code]


def text_outside_fences(doc: Path) -> str:
    return re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)


# --- (a) the snippets run --------------------------------------------------------------------

def test_every_python_snippet_runs_or_says_why_not() -> None:
    runnable = {id(b) for b in CLIENT_SNIPPETS + NODE_SNIPPETS}
    unchecked = [b.where for b in PYTHON if b.not_run is None and id(b) not in runnable]
    assert not unchecked, f"python snippets neither run by this test nor marked not-run: {unchecked}"
    assert CLIENT_SNIPPETS and NODE_SNIPPETS
    for block in ALL_BLOCKS:
        assert block.not_run is None or len(block.not_run) >= 10, (
            f"{block.where}: a not-run marker needs a reason")


def node_module(block: Block) -> str:
    return "docnodes_" + re.sub(r"\W", "_", f"{block.doc.relative_to(REPO_ROOT)}_{block.line}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's manifest as pipeline.yaml, and every node snippet as a module."""
    path = tmp_path_factory.mktemp("docs")
    (path / "pipeline.yaml").write_text(readme_manifest())
    for block in NODE_SNIPPETS:
        (path / f"{node_module(block)}.py").write_text(block.code)
    return path


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[ServerProcess]:
    args = [arg for block in NODE_SNIPPETS for arg in ("--node-module", node_module(block))]
    # The README's manifest (pipeline.yaml, named "mix") is also a model of the Open Inference
    # Protocol, as the README's Triton snippet calls it.
    args += ["--pipelines", str(workdir)]
    # The server's working directory is the one with the snippets (ServerProcess runs it in
    # log_dir): `serve --node-module` imports them from there, as the README says.
    with ServerProcess.start(log_dir=workdir, args=args,
                             env={"TENSORLINE_SANDBOX_WORKERS": "1"}) as process:
        yield process


def readme_manifest() -> str:
    """The manifest of the README's "A manifest" section: its first (later ones illustrate
    other features, e.g. a named pipeline's declarations)."""
    return next(b.code for b in blocks(REPO_ROOT / "README.md")
            if b.lang == "yaml" and "nodes:" in b.code)


@pytest.mark.parametrize("block", CLIENT_SNIPPETS, ids=lambda b: b.where)
def test_client_snippet_runs_against_a_real_server(block: Block, server: ServerProcess,
                                                   workdir: Path) -> None:
    code = block.code.replace(DOC_TARGET, server.target)
    # As a reader would run it: the installed package, nothing of the repository on the path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True,
                          text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{block.where}:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), f"{block.where} printed nothing"


def run_one(client: Client, node_type: str, params: dict[str, Any], value: Any) -> Any:
    manifest = {"nodes": [{"id": "n", "node_type": node_type, "params": params}]}
    return client.execute(manifest, {"n": value})["n"]


def check_gain(client: Client) -> None:
    out = run_one(client, "Gain", {"gain": 2.5}, np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(out, np.arange(4, dtype=np.float32) * 2.5)


def check_stats(client: Client) -> None:
    out = run_one(client, "Stats", {}, np.arange(6, dtype=np.float64).reshape(2, 3))
    assert out == Json({"mean": 2.5, "shape": [2, 3]})  # "sent as Json"


def check_batch(client: Client) -> None:
    manifest = {"nodes": [{"id": "b", "node_type": "Batch"}]}
    with client.stream(manifest) as session:
        for i in range(6):
            session.send("b", np.full(2, i, dtype=np.int32))
        session.close()
        outputs = [out.value for out in session]
    # Batches of four chunks, and what is held is flushed at the end of the stream.
    assert [o.tolist() for o in outputs] == [[0, 0, 1, 1, 2, 2, 3, 3], [4, 4, 5, 5]]


def check_spectrum(client: Client) -> None:
    signal = np.sin(np.arange(300, dtype=np.float32))
    out = run_one(client, "Spectrum", {"size": 512}, signal)
    np.testing.assert_allclose(out, np.abs(np.fft.rfft(signal, n=512)), rtol=1e-5, atol=1e-4)
    # Its warm-up example is a call it accepts: the same params, an input of the right kind.
    registry = NodeRegistry()
    registry.load_module(entry_module("Spectrum"))
    node_cls = registry.get("Spectrum").cls
    assert node_cls is not None
    (example,) = node_cls.warmup
    assert example.params == {"size": 512} and example.inputs["in"].shape == (512,)


def check_my_torch_node(client: Client) -> None:
    # "-> sandbox, 1 GiB cap": the selector's decision from the declared traits.
    (entry,) = [n for n in client.list_nodes() if n.node_type == "MyTorchNode"]
    registry = NodeRegistry()
    registry.load_module(entry_module(entry.node_type))
    decision = Selector(sandbox_available=True).decide("n", registry.get("MyTorchNode"), None)
    assert (decision.runtime, decision.reason) == ("sandbox", "trait: uses heavy library torch")
    assert registry.get("MyTorchNode").traits.memory_mb == 1024


# What each documented node does, as its doc says; every node a snippet defines needs an entry.
NODE_CHECKS: dict[str, Callable[[Client], None]] = {
    "Gain": check_gain,
    "Stats": check_stats,
    "Batch": check_batch,
    "MyTorchNode": check_my_torch_node,
    "Spectrum": check_spectrum,
}


def entry_module(node_type: str) -> str:
    for block in NODE_SNIPPETS:
        if re.search(rf"^class {node_type}\(", block.code, re.M):
            return node_module(block)
    raise KeyError(node_type)


def test_node_snippets_do_what_their_docs_say(server: ServerProcess, workdir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(workdir))
    defined = sorted(name for block in NODE_SNIPPETS
                     for name in re.findall(r"^class (\w+)\(", block.code, re.M))
    assert sorted(NODE_CHECKS) == defined, "every node of a doc snippet needs a check here"
    with Client(server.target, timeout=60) as client:
        catalogue = {info.node_type for info in client.list_nodes()}
        assert set(defined) <= catalogue, "serve --node-module did not load the snippets"
        for check in NODE_CHECKS.values():
            check(client)


def test_node_snippets_are_nodes() -> None:
    for block in NODE_SNIPPETS:
        namespace: dict[str, Any] = {"__name__": node_module(block)}
        exec(compile(block.code, block.where, "exec"), namespace)
        nodes = [v for v in namespace.values()
                 if isinstance(v, type) and issubclass(v, Node) and v.__module__ == namespace["__name__"]]
        assert nodes, block.where
        registry = NodeRegistry()
        for node in nodes:
            registry.register(node)


MANIFEST_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("json", "yaml") and "nodes" in b.code]


@pytest.mark.parametrize("block", MANIFEST_BLOCKS, ids=lambda b: b.where)
def test_documented_manifests_are_valid(block: Block, tmp_path: Path) -> None:
    """Valid on a server whose model root holds the model files the manifest names."""
    data = json.loads(block.code) if block.lang == "json" else yaml.safe_load(block.code)
    registry = NodeRegistry.default()
    missing = {node["node_type"]: registry.optional[node["node_type"]] for node in data["nodes"]
               if node["node_type"] in registry.optional}
    if missing:  # as the torch node tests do where torch is absent (CI installs it)
        pytest.skip(f"node types {sorted(missing)} need {sorted(set().union(*missing.values()))}, "
                    "not installed here")
    for node in data["nodes"]:
        if node["node_type"] in ("OnnxModel", "TorchScriptModel"):
            model = tmp_path / node["params"]["path"]
            model.parent.mkdir(parents=True, exist_ok=True)
            model.write_bytes(b"")
    compile_manifest(data, registry, Selector(sandbox_available=True),
                     model_roots=[str(tmp_path)])


def test_shipped_nodes_table_matches_the_catalogue() -> None:
    """docs/runtime-selection.md, "The shipped nodes": declared traits and the auto runtime of
    every node the server ships (the torch nodes where torch is installed, as in CI)."""
    doc = (REPO_ROOT / "docs" / "runtime-selection.md").read_text()
    section = doc.split("### The shipped nodes", 1)[1].split("\n\n", 2)[1]
    registry = NodeRegistry.default()
    selector = Selector(sandbox_available=True)
    documented = set()
    for row in section.splitlines()[2:]:
        nodes, traits, runtime = (cell.strip() for cell in row.strip("|").split("|"))
        expected = NodeTraits() if traits == "none" else eval(  # the cell is Python kwargs
            f"NodeTraits({', '.join(re.findall(r'`([^`]+)`', traits))})")
        for node_type in re.findall(r"`(\w+)`", nodes):
            documented.add(node_type)
            if node_type not in registry:
                assert node_type.startswith("Torch"), node_type  # only torch is optional
                continue
            entry = registry.get(node_type)
            assert entry.traits == expected, node_type
            assert selector.decide("n", entry, None).runtime == runtime, node_type
    assert {entry.node_type for entry in registry} <= documented


def test_heavy_library_keywords_are_the_selectors() -> None:
    doc = (REPO_ROOT / "docs" / "runtime-selection.md").read_text()
    paragraph = doc.split("### Heavy-library keywords", 1)[1].strip().split("\n\n")[0]
    listed = re.findall(r"`(\w+)`", paragraph.split("(the reference")[0])
    assert tuple(listed) == HEAVY_LIBRARIES


# --- (b) environment variables and settings ----------------------------------------------------

SETTINGS = {name.upper(): field for name, field in Settings.model_fields.items()}
# Variables that are not settings, and the file that reads each (so they are real too).
OTHER_VARIABLES = {
    "CONFIG": REPO_ROOT / "server" / "_settings.py",      # the settings file to read
    "SERVER": REPO_ROOT / "client" / "cli" / "_app.py",   # the CLI's --server
    "TOKEN": REPO_ROOT / "client" / "cli" / "_app.py",    # the CLI's --token
    "LB_PORT": REPO_ROOT / "docker" / "docker-compose.yml",  # the compose balancer's port
}

# Named in the README on purpose though no setting: the reserved family of the test suite, and
# the misspelling that shows how serve refuses an unknown variable (it must stay a typo).
RESERVED_FAMILIES = {"TEST_*"}
MISSPELLED_EXAMPLES = {"SANBOX_WORKERS"}


def documented_variables() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for doc in DOCS:
        for match in re.finditer(r"TENSORLINE_([A-Z0-9_]*)(\*?)", doc.read_text()):
            name = match.group(1) + match.group(2)
            found.setdefault(name, []).append(str(doc.relative_to(REPO_ROOT)))
    return found


def test_every_documented_variable_exists() -> None:
    unknown = {}
    assert not MISSPELLED_EXAMPLES & set(SETTINGS)
    for name, where in documented_variables().items():
        if name in RESERVED_FAMILIES or name in MISSPELLED_EXAMPLES:
            continue
        if name.endswith("*"):  # a family, e.g. TENSORLINE_SANDBOX_*
            ok = any(setting.startswith(name[:-1]) for setting in SETTINGS)
        else:
            ok = name in SETTINGS or name in OTHER_VARIABLES
        if not ok:
            unknown[name] = where
    assert not unknown, f"not settings nor known variables: {unknown}"
    for name, path in OTHER_VARIABLES.items():
        assert f"TENSORLINE_{name}" in path.read_text(), (name, path)


def readme_table() -> dict[str, str]:
    rows = re.findall(r"^\| `TENSORLINE_([A-Z0-9_]+)` \| (.*?) \|", (REPO_ROOT / "README.md").read_text(),
                      re.M)
    return dict(rows)


def shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


def test_readme_table_lists_every_setting_with_its_default() -> None:
    table = readme_table()
    assert set(table) == set(SETTINGS), (
        f"missing from README: {sorted(set(SETTINGS) - set(table))}; "
        f"not settings: {sorted(set(table) - set(SETTINGS))}")
    wrong = {}
    for name, cell in table.items():
        # The field's own default (not Settings(), which would read the environment).
        default = SETTINGS[name].get_default(call_default_factory=True)
        literal = re.fullmatch(r"`(.*)`", cell)
        if literal is not None:
            if literal.group(1) != shown(default):
                wrong[name] = (cell, shown(default))
        elif cell in ("unset", "empty"):
            if default not in (None, []):
                wrong[name] = (cell, shown(default))
        # Anything else is prose for a computed default (generated, temp dir, workers + 2, ...):
        # the setting's default must then be computed, not a value the table could show.
        elif default is not None and name != "INSTANCE_ID":
            wrong[name] = (cell, shown(default))
    assert not wrong, f"README default differs from Settings: {wrong}"


# --- (c) CLI commands and options --------------------------------------------------------------

def cli_options() -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    options: dict[str, set[str]] = {}
    for name, command in group.commands.items():
        options[name] = {opt for param in command.params if isinstance(param, typer.core.TyperOption)
                         for opt in (*param.opts, *param.secondary_opts)} | {"--help"}
    return options


# Code spans that quote what tensorline prints, not commands.
OUTPUT_LINES = ("tensorline listening on",)


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, command, options) of every ``tensorline COMMAND ...`` in code (spans and shell
    blocks), a shell block's continued lines joined."""
    found = []
    for doc in DOCS:
        pieces = re.findall(r"`([^`\n]+)`", text_outside_fences(doc))
        for block in blocks(doc):
            if block.lang in ("sh", "bash", ""):
                joined = block.code.replace("\\\n", " ").splitlines()
                pieces += [line.split(" #")[0] for line in joined]  # comments are prose
        for piece in pieces:
            if piece.startswith(OUTPUT_LINES):
                continue
            for match in re.finditer(r"(?:^|[\s;&|(/])tensorline ([a-z]+)([^#;&|]*)", piece):
                options = re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", match.group(2))
                found.append((str(doc.relative_to(REPO_ROOT)), match.group(1), options))
    return found


def test_every_documented_command_and_option_exists() -> None:
    commands = cli_options()
    found = documented_commands()
    assert len(found) > 20
    wrong = [(where, command, [o for o in options if o not in commands.get(command, set())])
             for where, command, options in found
             if command not in commands or not set(options) <= commands[command]]
    assert not wrong, f"not in the CLI: {wrong}"
    # Every command is documented somewhere.
    assert set(commands) <= {command for _, command, _ in found}


# Options in code spans of their own that belong to another program, and the file that has them.
OTHER_OPTIONS = {**{option: REPO_ROOT / "bench" / "bench_unary.py"
                    for option in ("--loop", "--echo-loop", "--node", "--runtime", "--before",
                                   "--against", "--tuned-echo", "--max-bytes", "--cpu-detail",
                                   "--in-flight")},
                 **{option: REPO_ROOT / "bench" / "soak_streams.py"
                    for option in ("--streams", "--clients", "--pipeline")},
                 "--floor": REPO_ROOT / "bench" / "bench_server_cost.py",
                 "--batches": REPO_ROOT / "bench" / "bench_sandbox_hop.py"}


def test_options_in_code_spans_of_their_own_exist() -> None:
    """``--untrusted-module``, ``--log-format json`` and the like, named without the command:
    an option of some tensorline command. docker/README.md's are podman's and Docker's."""
    every = set().union(*cli_options().values())
    unknown = []
    for doc in DOCS:
        if doc == REPO_ROOT / "docker" / "README.md":
            continue
        for span in re.findall(r"`(--[a-z][a-z-]*)[^`]*`", text_outside_fences(doc)):
            if span in OTHER_OPTIONS:
                assert span in OTHER_OPTIONS[span].read_text()
            elif span not in every:
                unknown.append((str(doc.relative_to(REPO_ROOT)), span))
    assert not unknown


def test_cli_environment_variables_are_documented() -> None:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    variables = {param.envvar for command in group.commands.values() for param in command.params
                 if isinstance(param, typer.core.TyperOption) and isinstance(param.envvar, str)}
    assert variables
    readme = (REPO_ROOT / "README.md").read_text()
    assert {v for v in variables if v not in readme} == set()


# --- (d) links and paths -----------------------------------------------------------------------

def anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", text_outside_fences(doc), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_no_link_points_at_a_missing_file_or_anchor() -> None:
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", text_outside_fences(doc)):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path_part, _, anchor = target.partition("#")
            path = (doc.parent / path_part).resolve() if path_part else doc
            missing_anchor = (path.exists() and anchor and path.suffix == ".md"
                              and anchor not in anchors(path))
            if not path.exists() or missing_anchor:
                broken.append((str(doc.relative_to(REPO_ROOT)), target))
    assert not broken


REPO_PATH = re.compile(r"^(?:\.\./)?[\w.-]+/[\w./-]*?(?:\.(?:py|md|yml|yaml|toml|cfg|conf|sh|proto|json)|/)"
                       r"(?:::[\w\[\]-]+)?$")


def test_paths_in_code_spans_exist() -> None:
    missing = []
    for doc in DOCS:
        for span in re.findall(r"`([^`\n]+)`", text_outside_fences(doc)):
            if not REPO_PATH.match(span) or "*" in span or "<" in span:
                continue
            path = span.split("::")[0]
            if not ((REPO_ROOT / path).exists() or (doc.parent / path).exists()):
                missing.append((str(doc.relative_to(REPO_ROOT)), span))
    assert not missing


def test_scripts_in_shell_blocks_exist_with_their_options() -> None:
    """``python bench/bench_unary.py --runtime sandbox`` and the like (indented blocks too): the
    script is in the repository and takes every option shown (its ``--help`` lists it)."""
    helps: dict[Path, str] = {}

    def help_of(script: Path) -> str:
        if script not in helps:
            helps[script] = subprocess.run(
                [sys.executable, str(script), "--help"], cwd=REPO_ROOT, capture_output=True,
                text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}).stdout
        return helps[script]

    wrong = []
    for doc in DOCS:
        lines = [line for b in blocks(doc) if b.lang in ("sh", "bash", "")
                 for line in b.code.replace("\\\n", " ").splitlines()]
        lines += re.findall(r"^ {4}(\S.*)$", text_outside_fences(doc), re.M)
        for line in lines:
            call = re.search(r"python\S* (?:-m pytest )?(\S+\.py)(.*)", line.split(" #")[0])
            if call is None:
                continue
            script = REPO_ROOT / call.group(1)
            if not script.exists():
                wrong.append((str(doc.relative_to(REPO_ROOT)), call.group(1)))
                continue
            for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", call.group(2)):
                if option not in re.findall(r"--[a-z][a-z-]*", help_of(script)):
                    wrong.append((str(doc.relative_to(REPO_ROOT)), call.group(1), option))
    assert not wrong


def test_nothing_points_outside_the_repository() -> None:
    """Notes beside the repository are no part of it: a doc, comment or test that needs a fact
    from there states the fact (and its public source)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    # Spelled in pieces so that this test's own source is not a hit.
    outside = re.compile(r"(?<![\w-])(?:\.\./)?" + "shared" + r"/notes|\.\./" + "shared" + r"\b")
    offenders = []
    for name in tracked:
        path = REPO_ROOT / name
        try:
            text = path.read_text()
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if outside.search(line):
                offenders.append(f"{name}:{number}")
    assert not offenders
