"""The docs name only what exists, and only commands that run: README.md and docs/*.md.

- every relative Markdown link resolves to a file of the repository, and its ``#anchor`` to a heading there;
- every repository path in code (inline spans and fenced blocks: ``configs/...``, ``benchmarks/...``,
  ``docs/...``, ``tests/...``, package modules such as ``callbacks/measures.py``, preset short forms such as
  ``optim/adam.yaml``) exists; ``{a,b}`` lists and ``[optional]`` parts are expanded, ``<placeholders>`` and
  ``*`` match as globs;
- every ``python cli.py fit ...`` / ``flatminima fit ...`` command parses and builds its model, data module
  and trainer without training (``cli.main(..., run=False)``, in this process); commands that need a
  checkpoint, a GPU or a placeholder filled in have their ``--config`` files checked instead;
- every ``study run|analyze`` command parses with the study command line, and the study file it names loads;
- every ``python <script>.py --flag ...`` names an existing script whose source holds each ``--flag``.

``test_checks_catch_breakage`` feeds the same checks a page with one mistake of each kind.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import glob
import io
import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from flatminima import cli
from flatminima.studies import cli as study_cli
from flatminima.studies.spec import load as load_study

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Paths the docs name on purpose although they do not exist, with the reason.
KNOWN_ABSENT = {"configs/optim/adamm.yaml": "the example of a study file's error message"}
#: File names the docs use for outputs or placeholders, never looked for under configs/.
NOT_PRESETS = {"config.yaml", "study.yaml", "STUDY.yaml", "s.yaml", "bench.yaml"}
#: Top-level folders of the repository whose paths are checked, and the preset groups of configs/.
TOP = ("configs", "benchmarks", "docs", "tests", "callbacks", "lightning_modules", "datamodules", "studies")
TOP += ("cli_support", "formats", ".ci")
GROUPS = ("data", "model", "optim", "minimizer", "trainer", "experiments")
PATH = re.compile(rf"(?<![\w./<>{{}}$-])((?:{'|'.join(map(re.escape, TOP + GROUPS))})/[\w./{{}},*<>\[\]+=-]*)")
BARE_PRESET = re.compile(r"(?<![\w./<>{}$-])([\w<>-]+\.yaml)\b")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
INLINE = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^\s*```(\w*)\s*$")
PLACEHOLDER = re.compile(r"<[^<>]*>|\.\.\.|…|\[|\]")
SUBCOMMANDS = ("fit", "validate", "test", "predict")
KINDS = ("cli", "study", "script")


@dataclass(frozen=True)
class Snippet:
    """A piece of code in a page: a fenced block (``lang`` set, possibly empty) or an inline span (``lang`` None)."""

    page: str
    line: int
    text: str
    lang: str | None


@dataclass(frozen=True)
class Page:
    """A Markdown page split into its prose lines and its code."""

    path: Path
    prose: tuple[tuple[int, str], ...]
    code: tuple[Snippet, ...]
    headings: tuple[str, ...]


def read_page(path: Path, root: Path = ROOT) -> Page:
    """Split ``path`` into prose lines (inline code kept), code snippets and heading texts."""
    name = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
    prose, code, headings = [], [], []
    block: list[str] | None = None
    lang, start = "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = FENCE.match(line)
        if block is not None:
            if fence and not fence.group(1):
                code.append(Snippet(name, start, "\n".join(block), lang))
                block = None
            else:
                block.append(line)
            continue
        if fence:
            block, lang, start = [], fence.group(1), number
            continue
        prose.append((number, line))
        if line.startswith("#"):
            headings.append(line.lstrip("#").strip())
        code += [Snippet(name, number, m.group(1), None) for m in INLINE.finditer(line)]
    return Page(path, tuple(prose), tuple(code), tuple(headings))


@functools.cache
def pages() -> tuple[Page, ...]:
    return tuple(read_page(p) for p in PAGES)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Page) -> set[str]:
    """The anchors of a page's headings (a repeated heading gets ``-1``, ``-2``, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for heading in page.headings:
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


# ---------------------------------------------------------------------------------------- links
def link_problems(page: Page, root: Path = ROOT) -> list[str]:
    """Relative links whose file is missing or whose ``#anchor`` names no heading of it."""
    problems = []
    for number, line in page.prose:
        for target in LINK.findall(INLINE.sub("", line)):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (page.path.parent / file).resolve() if file else page.path
            where = f"{page.path.name}:{number}: ({target})"
            if not path.exists():
                problems.append(f"{where}: no file {path}")
            elif anchor and path.suffix == ".md" and anchor not in anchors(read_page(path, root)):
                problems.append(f"{where}: no heading with the anchor #{anchor} in {path.name}")
    return problems


# ---------------------------------------------------------------------------------------- paths
def expand(path: str) -> list[str]:
    """``{a,b}`` lists and ``[optional]`` parts expanded; ``<placeholder>`` becomes ``*``."""
    path = re.sub(r"<[^<>/]*>", "*", path)
    braces = re.search(r"\{([^{}]*)\}", path)
    if braces:
        return [e for v in braces.group(1).split(",") for e in expand(path.replace(braces.group(0), v.strip(), 1))]
    optional = re.search(r"\[([^\[\]]*)\]", path)
    if optional:
        return expand(path.replace(optional.group(0), optional.group(1), 1)) + expand(
            path.replace(optional.group(0), "", 1)
        )
    return [path]


def balanced(path: str) -> str:
    """``path`` without closing brackets it does not open (``[a/b.yaml]`` in a YAML list gives ``a/b.yaml]``)."""
    for opening, closing in ("[]", "{}", "()"):
        while path.endswith(closing) and path.count(closing) > path.count(opening):
            path = path[:-1]
    return path


def exists(path: str, root: Path) -> bool:
    """Whether ``path`` (glob characters allowed) names something under ``root``."""
    if any(c in path for c in "*?"):
        return bool(glob.glob(str(root / path)))
    return (root / path).exists()


def path_problems(page: Page, root: Path = ROOT) -> list[str]:
    """Repository paths named in code that do not exist (configs/, benchmarks/, docs/, modules, presets)."""
    problems = []
    for snippet in page.code:
        for number, line in enumerate(snippet.text.splitlines(), snippet.line + (snippet.lang is not None)):
            for found in PATH.findall(line):
                named = balanced(found.split("::")[0].rstrip(".,:;"))
                if named in KNOWN_ABSENT:
                    continue
                top = named.split("/")[0]
                if top in GROUPS and not named.endswith(".yaml"):
                    continue  # data/abalone/..., a file under data_dir; only presets are checked in short form
                base = f"configs/{named}" if top in GROUPS or (named.endswith(".yaml") and top != "configs") else named
                missing = [p for p in expand(base) if not exists(p, root)]
                if missing:
                    problems.append(f"{page.path.name}:{number}: {named}: not found ({', '.join(missing)})")
            for name in BARE_PRESET.findall(line):
                if name not in NOT_PRESETS and not any(exists(f"configs/*/{p}", root) for p in expand(name)):
                    problems.append(f"{page.path.name}:{number}: {name}: no such preset under configs/")
    return problems


# ---------------------------------------------------------------------------------------- commands
def shell_commands(text: str) -> list[tuple[int, list[str]]]:
    """The commands of shell text (a block or an inline span): (line offset, words), split at ``&&``, ``;``, ``|``."""
    commands, pending, first = [], "", 0
    for offset, line in enumerate(text.splitlines()):
        first = offset if not pending else first
        pending += line + "\n"
        if line.rstrip().endswith("\\"):
            continue
        lexer = shlex.shlex(pending.replace("\\\n", " "), posix=True, punctuation_chars="&;|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        try:
            words = list(lexer)
        except ValueError:  # a quoted string goes on over the next line
            continue
        pending = ""
        for is_separator, group in itertools.groupby(words, key=lambda w: set(w) <= set("&;|")):
            if not is_separator and (command := _without_shell(list(group))):
                commands.append((first, command))
    return commands


def _without_shell(words: list[str]) -> list[str]:
    """Drop leading variable assignments and ``sudo``, ``> file`` redirections; ``$(...)/x`` is ``ROOT/x``."""
    while words and (re.match(r"^[A-Za-z_]\w*=", words[0]) or words[0] in ("sudo", "time", "nice")):
        words = words[1:]
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in (">", ">>", "2>"):
            skip = True
        else:
            out.append(re.sub(r"^\$\(.*\)(?=/)", str(ROOT), word))
    return out


@dataclass(frozen=True)
class Command:
    """A command the docs show: ``kind`` is ``cli`` (fit, test, ...), ``study`` or ``script``."""

    kind: str
    words: tuple[str, ...]
    where: str


def classify(words: list[str], where: str) -> Command | None:
    """The command ``words`` run, or None for commands this test does not check (pip, pytest, ...)."""
    if words[:2] == ["python", "cli.py"] or words[:1] == ["flatminima"]:
        args = words[2:] if words[0] == "python" else words[1:]
        return Command("study" if args[:1] == ["study"] else "cli", tuple(args), where)
    if words[:1] == ["python"] and len(words) > 1 and words[1].endswith(".py"):
        return Command("script", tuple(words[1:]), where)
    return None


def page_commands(page: Page) -> list[Command]:
    """Every command of a page's shell blocks and of its inline spans that start like one."""
    found = []
    for snippet in page.code:
        if snippet.lang is None:
            starts = re.match(r"^(\w+=\S+ )*(python \S+\.py|flatminima )", snippet.text)
            if not starts or re.search(r"\w\|\w", snippet.text):  # not a command, or a synopsis (fit|test)
                continue
        elif snippet.lang not in ("bash", "sh"):
            continue
        for offset, words in shell_commands(snippet.text):
            line = snippet.line + offset + (snippet.lang is not None)
            command = classify(words, f"{snippet.page}:{line}")
            if command is not None:
                found.append(command)
    return found


def commands(kind: str) -> list[Command]:
    """The distinct commands of one kind over every page (the first place each appears)."""
    unique: dict[tuple[str, ...], Command] = {}
    for page in pages():
        for command in page_commands(page):
            if command.kind == kind:
                unique.setdefault(command.words, command)
    return list(unique.values())


def config_values(args: tuple[str, ...]) -> list[str]:
    """The values of ``--config``/``-c`` in ``args``."""
    values = [b for a, b in zip(args, args[1:]) if a in ("--config", "-c")]
    return values + [a.split("=", 1)[1] for a in args if a.startswith(("--config=", "-c="))]


def cli_problem(command: Command, root: Path = ROOT) -> str | None:
    """Why a ``fit``/``test``/... command would not start, or None. Builds what ``fit`` builds (no training)."""
    args = list(command.words)
    if not args:
        return None  # `python cli.py` named in a sentence
    missing = [c for c in config_values(command.words) if not any(exists(p, root) for p in expand(c))]
    if missing:
        return f"{command.where}: --config file not found: {', '.join(missing)}"
    needs_more = (
        any(PLACEHOLDER.search(a) for a in args)
        or "--ckpt_path" in args
        or (args[:1] != ["fit"] and args[:1] and args[0] in SUBCOMMANDS)
        or any("trainer/gpu.yaml" in a for a in args)
    )
    if needs_more:  # a checkpoint, a GPU or a filled-in placeholder: the config files above are all we check
        return None
    if args[:1] == ["fit"]:
        args = args[1:]
    quiet, shown = io.StringIO(), f"{command.where}: {' '.join(command.words)}"
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            if "--help" in args or "-h" in args:
                cli.main(args)
            else:
                cli.main([*args, "--trainer.logger=false"], run=False)
    except SystemExit as stop:
        if stop.code not in (0, None):
            return f"{shown}: exit code {stop.code}: {quiet.getvalue().strip()[-500:]}"
    except Exception as err:  # noqa: BLE001 - any failure to build the run is the finding
        return f"{shown}: {type(err).__name__}: {err}"
    return None


@functools.cache
def study_help(subcommand: str) -> str:
    """The ``--help`` text of ``study run`` or ``study analyze``."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        study_cli.parser().parse_args([subcommand, "--help"])
    return text.getvalue()


def study_problem(command: Command, root: Path = ROOT) -> str | None:
    """Why a ``study run|analyze`` command would be refused (its flags, its study file), or None."""
    args = list(command.words[1:])
    shown = f"{command.where}: {' '.join(command.words)}"
    if any(PLACEHOLDER.search(a) for a in args):  # a synopsis: each flag must be one the subcommand has
        flags = [a.strip("[]").split("=")[0] for a in args if a.strip("[]").startswith("--")]
        unknown = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", study_help(args[0]))]
        return f"{shown}: unknown options {unknown}" if unknown else None
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stderr(quiet):
            parsed = study_cli.parser().parse_args(args)
    except SystemExit:
        return f"{shown}: refused: {quiet.getvalue().strip()[-300:]}"
    if parsed.command == "run" and "/" in parsed.study:
        try:
            load_study(str(root / parsed.study))
        except Exception as err:  # noqa: BLE001 - any failure to load the study file is the finding
            return f"{shown}: the study file does not load: {err}"
    return None


def script_problem(command: Command, root: Path = ROOT) -> str | None:
    """Why a ``python <script>.py --flag ...`` command names a missing script or an option it lacks, or None."""
    script = root / command.words[0]
    if not script.is_file():
        return f"{command.where}: no script {command.words[0]}"
    source = script.read_text(encoding="utf-8")
    flags = [w.split("=")[0] for w in command.words[1:] if w.startswith("--")]
    unknown = [f for f in flags if f'"{f}"' not in source and f"'{f}'" not in source]
    return f"{command.where}: {command.words[0]} has no option {unknown}" if unknown else None


def import_problems(page: Page) -> list[str]:
    """Import statements of the Python blocks (and inline spans that are one) that fail: the names the docs use."""
    problems = []
    for snippet in page.code:
        if snippet.lang != "python" and not (snippet.lang is None and re.match(r"^(from|import) ", snippet.text)):
            continue
        try:
            tree = ast.parse(snippet.text)
        except SyntaxError:  # an inline span with "..." in it
            continue
        for node in tree.body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                try:
                    exec(compile(ast.Module([node], []), page.path.name, "exec"), {})
                except Exception as err:  # noqa: BLE001 - any failure to import is the finding
                    problems.append(f"{snippet.page}:{snippet.line}: {ast.unparse(node)}: {type(err).__name__}: {err}")
    return problems


# ---------------------------------------------------------------------------------------- the tests
def _id(value: object) -> str:
    return value.where if isinstance(value, Command) else str(value.relative_to(ROOT))


@pytest.mark.parametrize("path", PAGES, ids=_id)
def test_links_resolve(path):
    assert link_problems(next(p for p in pages() if p.path == path)) == []


@pytest.mark.parametrize("path", PAGES, ids=_id)
def test_named_paths_exist(path):
    assert path_problems(next(p for p in pages() if p.path == path)) == []


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")  # torch_geometric's import, not ours
@pytest.mark.parametrize("path", PAGES, ids=_id)
def test_python_imports_resolve(path):
    assert import_problems(next(p for p in pages() if p.path == path)) == []


def test_the_pages_show_commands_of_each_kind():
    """The pages do show commands: the checks below run on something (their count fails if parsing broke)."""
    assert len(commands("cli")) >= 10 and len(commands("study")) >= 5 and len(commands("script")) >= 5


@pytest.mark.parametrize("command", commands("cli"), ids=_id)
def test_cli_command_builds(command, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli_problem(command) is None


@pytest.mark.parametrize("command", commands("study"), ids=_id)
def test_study_command_parses_and_its_file_loads(command, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert study_problem(command) is None


@pytest.mark.parametrize("command", commands("script"), ids=_id)
def test_script_command_names_its_options(command):
    assert script_problem(command) is None


def test_checks_catch_breakage(tmp_path, monkeypatch):
    """A page with one mistake of each kind: every check reports its own."""
    monkeypatch.chdir(ROOT)
    page = tmp_path / "broken.md"
    page.write_text(
        "# Title\n\nSee [the rules](cli.md), [a section](broken.md#no-such-heading) and [this](broken.md#title).\n\n"
        "The preset `configs/minimizer/samm.yaml`, the module `callbacks/measure.py`, `optim/{sgd,adamm}.yaml`.\n\n"
        "```bash\n"
        "python cli.py fit --config configs/minimizer/sam.yaml --model.init_args.minimizer.init_args.rh 0.1\n"
        "python cli.py fit --config configs/minimizer/samm.yaml\n"
        "python cli.py study run configs/studies/moons_quick.yaml --wrkers 2\n"
        "python cli.py study run tests/test_docs.py\n"
        "python benchmarks/step_overhead.py --rule SAM\n"
        "python benchmarks/no_such_script.py\n"
        "```\n\n"
        "```python\n"
        "from flatminima.callbacks import MinimumSharpness, MinimalSharpness\n"
        "```\n",
        encoding="utf-8",
    )
    broken = read_page(page, tmp_path)
    links = link_problems(broken, tmp_path)
    assert len(links) == 2 and "cli.md" in links[0] and "#no-such-heading" in links[1]
    paths = path_problems(broken, ROOT)
    assert [p.split(": ")[1] for p in paths] == [
        "configs/minimizer/samm.yaml",
        "callbacks/measure.py",
        "optim/{sgd,adamm}.yaml",
        "configs/minimizer/samm.yaml",
        "benchmarks/no_such_script.py",
    ]
    assert "adamm" in paths[2] and "sgd" not in paths[2].split("(")[1]
    cli_commands, study_commands, scripts = ([c for c in page_commands(broken) if c.kind == k] for k in KINDS)
    assert "exit code 2" in cli_problem(cli_commands[0]) and "rh" in cli_problem(cli_commands[0])
    assert "not found" in cli_problem(cli_commands[1])
    assert "refused" in study_problem(study_commands[0])
    assert "does not load" in study_problem(study_commands[1])
    assert "--rule" in script_problem(scripts[0]) and "no script" in script_problem(scripts[1])
    assert len(import_problems(broken)) == 1 and "MinimalSharpness" in import_problems(broken)[0]
