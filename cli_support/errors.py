"""Errors as one line: jsonargparse's nested parser messages, and exceptions raised once a run started.

:func:`summarize` turns a parser message (60-70 indented lines of union alternatives) into one line
naming the key, what was given, what is accepted, and a close match where there is one (difflib):
``model.init_args.minimizer.init_args.rh: GSAM takes no argument 'rh'; accepted: rho, alpha, ...;
did you mean rho?``. :func:`runtime_line` gives ``DataNotFoundError: ...`` for an exception.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any

_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_CLASS = re.compile(r"^Problem with given class_path '([^']+)':\s*$")
_GIVEN = re.compile(r"^Given value: (.*)$")
_STRUCTURE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:")
_NOISE = (
    re.compile(r"^Expected a <class 'NoneType'>$"),
    re.compile(r"^Expected a path but .* either not accessible"),
    re.compile(r"^Expected a dot import path string"),
)
_OPTION = re.compile(r"^Option '([^']+)' is not accepted")
_EXPECTED = re.compile(r"^Expected a (.+?)(?:\. Got value: (.*))?$", re.S)
_NO_ATTR = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")
_NO_MODULE = re.compile(r"No module named '([\w.]+)'")
_CALLABLE = re.compile(r"^Type .+? expects a function or a callable class: (.*)$")
_GOT = re.compile(r"\. Got value: Namespace\(.*$")
_REQUIRED = re.compile(r"the following arguments are required: (.+)$")
_NESTED_VAL = re.compile(r"NestedArg\(key='[^']*', val='(.*)'\)$")


@dataclass
class Leaf:
    """One innermost message of the parser's tree, with the key path and class it belongs to."""

    path: tuple[str, ...]
    class_path: str | None
    text: str


def parse_tree(message: str) -> tuple[list[Leaf], dict[tuple[str, ...], str]]:
    """The leaves of jsonargparse's indented message, and the given value at each key path."""
    leaves: list[Leaf] = []
    given: dict[tuple[str, ...], str] = {}
    stack: list[tuple[int, str, str]] = []
    lines = message.splitlines()
    for number, raw in enumerate(lines):
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip())
        text = raw.strip()
        text = text[2:] if text.startswith("- ") else text
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if m := _CALLABLE.match(text):  # an optimizer/scheduler factory: the class's own tree follows inline
            rest = "\n".join(lines[number:])
            cls = re.search(r"Got value: Namespace\(class_path='([^']+)'", rest)
            stack.append((indent, "class", cls.group(1) if cls else ""))
            indent, text = indent + 1, _GOT.sub("", m.group(1))
        _parse_line(text, indent, stack, leaves, given)
    return leaves, given


def _parse_line(text: str, indent: int, stack: list, leaves: list[Leaf], given: dict) -> None:
    key, cls = _KEY.match(text), _CLASS.match(text)
    if key:
        stack.append((indent, "key", key.group(1)))
        if key.group(2):
            leaves.append(Leaf(_path(stack), _class(stack), _GOT.sub("", key.group(2))))
    elif cls:
        stack.append((indent, "class", cls.group(1)))
    elif (value := _GIVEN.match(text)) is not None:
        given[_path(stack)] = _GOT.sub("", value.group(1))
    elif text and not text.startswith(_STRUCTURE):
        leaves.append(Leaf(_path(stack), _class(stack), _GOT.sub("", text)))


def _path(stack: list[tuple[int, str, str]]) -> tuple[str, ...]:
    out: list[str] = []
    for _, kind, value in stack:
        out += value.split(".") if kind == "key" else ["init_args"]
    return tuple(out)


def _class(stack: list[tuple[int, str, str]]) -> str | None:
    return next((value for _, kind, value in reversed(stack) if kind == "class"), None)


def summarize(
    message: str,
    *,
    options: list[str] = (),
    keys: list[str] = (),
    configs: list[tuple[str, Any]] = (),
    subcommands: list[str] = (),
) -> str:
    """One line for a parser error ``message`` (no ``error:`` prefix).

    Args:
        message: jsonargparse's message.
        options: The option strings the parser accepts (``--trainer.max_epochs``), for close matches.
        keys: The config keys it accepts (``trainer.max_epochs``), for close matches of unknown keys.
        configs: ``(label, content)`` of the ``--config`` files, to say in which file a key is.
        subcommands: The subcommand names, for an unknown or missing subcommand.
    """
    text = message.strip()
    top = _top_level(text, options, keys, configs, subcommands)
    if top is not None:
        return top
    leaves, given = parse_tree(text)
    useful = [leaf for leaf in leaves if not any(p.match(leaf.text) for p in _NOISE)]
    if not useful:
        return _first_line(text)
    depth = max(len(leaf.path) for leaf in useful)
    deepest = [leaf for leaf in useful if len(leaf.path) == depth]
    path = deepest[0].path
    siblings = [leaf for leaf in leaves if leaf.path == path]
    line = _leaf_line(deepest[0], siblings, given, configs)
    return line or _first_line(text)


def _top_level(text: str, options, keys, configs, subcommands) -> str | None:
    """Messages that are not a tree: unknown options or subcommands, YAML problems, missing files."""
    first = text.splitlines()[0] if text else ""
    choices = ", ".join(subcommands) or "fit, validate, test, predict"
    if m := re.match(r"unrecognized arguments: (.*)$", first):
        return _unrecognized(m.group(1).split(), options)
    if m := re.match(r"argument subcommand: invalid choice: '([^']*)'", first):
        return f"unknown subcommand {m.group(1)!r}; expected one of {choices}" + _did_you_mean(m.group(1), subcommands)
    if first.startswith('expected "subcommand"'):
        return f"no subcommand given; expected one of {choices} (python cli.py --help)"
    if m := re.match(r"Subcommand '\w+' does not accept option '([^']+)'", first) or re.match(
        r"(?:Key|Option) '([^']+)' is not (?:accepted|expected)", first
    ):
        return _unknown_key(m.group(1), keys, configs)
    if first.startswith("Unexpected config"):
        return "a --config file is empty or not a mapping; expected YAML keys such as 'trainer: {max_epochs: 5}'"
    if first.startswith("Problems parsing config"):
        return "invalid YAML in a config value: " + " ".join(line.strip() for line in text.splitlines()[1:3])
    if m := re.match(r'Parser key "config": (.*)$', first):
        return f"--config: {m.group(1)}"
    return None


def _unrecognized(tokens: list[str], options) -> str:
    flags = [t.split("=", 1)[0] for t in tokens if t.startswith("-")]
    if flags:
        return (
            f"unknown option {flags[0]}"
            + _did_you_mean(flags[0], options)
            + (f" (also unknown: {' '.join(flags[1:])})" if len(flags) > 1 else "")
        )
    return (
        f"unexpected argument {tokens[0]!r}; options take the form --key value or --key=value"
        if tokens
        else "unrecognized arguments"
    )


def _unknown_key(key: str, keys, configs) -> str:
    return f"{key}: unknown key{_where(key, configs)}" + _did_you_mean(key, keys)


def _leaf_line(leaf: Leaf, siblings: list[Leaf], given: dict, configs) -> str | None:
    key = ".".join(leaf.path)
    value = _given_value(given.get(leaf.path))
    if m := _OPTION.match(leaf.text):
        full = f"{key}.{m.group(1)}" if key else m.group(1)
        accepted = _accepted_args(leaf.class_path)
        owner = (leaf.class_path or "").rpartition(".")[2] or "it"
        listed = f"; accepted: {', '.join(accepted)}" if accepted else ""
        return f"{full}: Option {m.group(1)!r} is not accepted by {owner}{_where(full, configs)}{listed}" + (
            _did_you_mean(m.group(1), accepted)
        )
    if m := _NO_ATTR.search(leaf.text):
        module, name = m.group(1), m.group(2)
        return f"{_object_key(leaf)}: no class {module}.{name}{_where(_object_key(leaf), configs)}" + _did_you_mean(
            name, _public_names(module), prefix=module + "."
        )
    if m := _NO_MODULE.search(leaf.text):
        return f"{_object_key(leaf)}: no module {m.group(1)}{_where(_object_key(leaf), configs)}; check the class path"
    if m := _REQUIRED.search(leaf.text):
        missing = [name.strip() for name in m.group(1).split(",")]
        owner = (leaf.class_path or "").rpartition(".")[2] or "the class"
        return f"{key}.{missing[0]}: required by {owner} but not set{_where(key, configs)}"
    expected = [s for s in siblings if _EXPECTED.match(s.text) and not any(p.match(s.text) for p in _NOISE[1:])]
    if expected:
        return _expected_line(key, expected, value, configs)
    return f"{key}: {leaf.text}" if key else None


def _object_key(leaf: Leaf) -> str:
    """The key of the object a class path was given for (without the trailing ``init_args``)."""
    path = leaf.path[:-1] if leaf.path and leaf.path[-1] == "init_args" else leaf.path
    return ".".join(path)


def _expected_line(key: str, leaves: list[Leaf], value: str | None, configs) -> str:
    types, got = [], value
    for leaf in leaves:
        m = _EXPECTED.match(leaf.text)
        types.append(m.group(1))
        got = m.group(2) if m.group(2) is not None else got
    literals = list(dict.fromkeys(v for t in types for v in _literal_values(t)))
    accepted = [_type_phrase(t) for t in types if not _literal_values(t)]
    if literals:
        accepted.insert(0, "one of " + ", ".join(repr(v) for v in literals))
    line = f"{key}: got {got!r}" if got is not None else f"{key}: invalid value"
    line += f"{_where(key, configs)}; expected {' or '.join(dict.fromkeys(accepted))}"
    if got is not None and got.strip().lower().lstrip("+-") in ("inf", "infinity", "nan"):
        return line + "; YAML writes infinity and NaN as .inf, -.inf and .nan"
    return line + (_did_you_mean(str(got), [str(v) for v in literals]) if got is not None and literals else "")


def _type_phrase(text: str) -> str:
    simple = {
        "<class 'int'>": "an int",
        "<class 'float'>": "a float",
        "<class 'bool'>": "true or false",
        "<class 'str'>": "a string",
        "<class 'NoneType'>": "null",
    }
    if text in simple:
        return simple[text]
    values = _literal_values(text)
    if values:
        return "one of " + ", ".join(repr(v) for v in values)
    return re.sub(r"<class '([\w.]+)'>", r"\1", text).replace("typing.", "")


def _literal_values(text: str) -> list[Any]:
    m = re.fullmatch(r"typing\.Literal\[(.*)\]", text.strip())
    if not m:
        return []
    try:
        import ast

        values = ast.literal_eval(f"[{m.group(1)}]")
    except (ValueError, SyntaxError):
        return []
    return list(values)


def _given_value(raw: str | None) -> str | None:
    if raw is None:
        return None
    m = _NESTED_VAL.search(raw)
    return m.group(1) if m else raw


def _where(key: str, configs) -> str:
    """`` (in FILE)`` for the last config file that sets ``key``."""
    parts = key.split(".")
    found = None
    for label, content in configs:
        node = content
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                node = ...
                break
            node = node[part]
        if node is not ...:
            found = label
    return f" (in {found})" if found else ""


def _did_you_mean(word: str, candidates, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _accepted_args(class_path: str | None) -> list[str]:
    """The ``__init__`` argument names of ``class_path``, with its parents' where it passes ``**kwargs`` on."""
    cls = _import(class_path)
    names: list[str] = []
    for klass in getattr(cls, "__mro__", ())[:-1]:
        try:
            params = inspect.signature(klass.__init__).parameters.values()
        except (TypeError, ValueError):
            break
        names += [
            p.name
            for p in params
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in ("self", "params")
            and p.name not in names
        ]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def _import(class_path: str | None) -> Any:
    if not class_path or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _public_names(module: str) -> list[str]:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return []
    return [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n, None))]


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "invalid arguments"


def runtime_line(err: BaseException) -> str:
    """``Type: message`` on one line for an exception raised once the run started."""
    message = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    name = type(err).__name__
    if isinstance(err, (ValueError, TypeError)) and message.startswith(("Invalid", "invalid")):
        return message
    return f"{name}: {message}" if message else name


def innermost(err: BaseException) -> BaseException:
    """The root cause of a chain of exceptions (``raise ... from``)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def locate(err: BaseException, config: Any) -> tuple[str, str]:
    """The config key and class path of the object whose ``__init__`` raised ``err`` (``("", "")`` if unknown)."""
    tb, cls = err.__traceback__, None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            cls = type(frame.f_locals["self"])
        tb = tb.tb_next
    if cls is None or config is None:
        return "", ""

    def search(node: Any, prefix: str) -> tuple[str, str] | None:
        if isinstance(node, dict):
            class_path = node.get("class_path")
            if isinstance(class_path, str) and _import(class_path) is cls:
                return prefix, class_path
            for k, v in node.items():
                found = search(v, f"{prefix}.{k}" if prefix else k)
                if found:
                    return found
        elif isinstance(node, list):
            for i, v in enumerate(node):
                found = search(v, f"{prefix}[{i}]")
                if found:
                    return found
        return None

    return search(config.as_dict(), "") or ("", f"{cls.__module__}.{cls.__qualname__}")
