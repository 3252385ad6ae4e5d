"""A user's function named `package.module:function`, checked without running any of the user's code.

Checking a config never imports a user module: importing runs the module's top-level code (a
`__main__` module runs a whole program). The module is found as the import system would find it
(`importlib.machinery.PathFinder`, package by package through `__path__`, never executing a
package's `__init__`), its source is parsed with `ast`, and the function's signature is read from
its `def`. What cannot be checked that way is refused: `__main__` modules, built-in and compiled
(C) modules, a name that is not a top-level `def` of the module's own source (a class, an
assignment such as a mock or a `functools.partial`, an import from elsewhere), and coroutines.
"""

from __future__ import annotations

import ast
import sys
from importlib.machinery import PathFinder, SourceFileLoader
from pathlib import Path

WRAP = "define it with `def` in a module of your own that calls it"


def function_definition(path: str) -> tuple[ast.FunctionDef | None, str | None]:
    """The `def` that `package.module:function` names, or (None, why it cannot be checked)."""
    module_name, _, attribute = path.partition(":")
    parts = module_name.split(".")
    if "__main__" in parts:
        return None, f"{path} is in a __main__ module, which runs a program when imported; {WRAP}"
    if parts[0] in sys.builtin_module_names:
        return None, f"{path} is in a built-in module whose source cannot be read; {WRAP}"
    search: list[str] | None = None
    spec = None
    for depth, part in enumerate(parts):
        spec = PathFinder.find_spec(part, search)
        if spec is None:
            return None, f"cannot import module '{module_name}' of {path}: no module named '{'.'.join(parts[:depth + 1])}'"
        if depth < len(parts) - 1:
            if spec.submodule_search_locations is None:
                return None, f"cannot import module '{module_name}' of {path}: '{'.'.join(parts[:depth + 1])}' is not a package"
            search = list(spec.submodule_search_locations)
    assert spec is not None
    if not isinstance(spec.loader, SourceFileLoader) or not spec.origin:
        return None, (f"module '{module_name}' of {path} has no Python source (a compiled or built-in module, or a "
                      f"namespace package); {WRAP}")
    try:
        tree = ast.parse(Path(spec.origin).read_bytes(), filename=spec.origin)
    except (OSError, SyntaxError, ValueError) as error:
        return None, f"cannot read module '{module_name}' of {path} ({spec.origin}): {type(error).__name__}: {error}"
    found: ast.stmt | None = None
    for node in _module_level(tree.body):  # the last binding of the name is what the module (probably) ends up with
        if _binds(node, attribute):
            found = node
    if found is None and any(isinstance(node, ast.ImportFrom) and node.names[0].name == "*" for node in _module_level(tree.body)):
        return None, f"{path} is not defined in {spec.origin} itself (it may come from an `import *`); {WRAP}"
    if found is None:
        return None, f"module '{module_name}' has no '{attribute}' (from {path})"
    if isinstance(found, ast.ClassDef):
        return None, f"{path} is a class, not a function; {WRAP}"
    if isinstance(found, ast.AsyncFunctionDef):
        return None, f"{path} is a coroutine function (async def); a metric must return a number"
    if not isinstance(found, ast.FunctionDef):
        return None, (f"{path} is not callable as checked: it is not a function defined with `def` in {spec.origin} "
                      f"(line {found.lineno}); {WRAP}")
    return found, None


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The module's statements in order, with those in its top-level if/try/with/for blocks (not in functions
    or classes)."""
    found: list[ast.stmt] = []
    for node in body:
        found.append(node)
        for block in ("body", "orelse", "finalbody"):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found += _module_level(getattr(node, block, []) or [])
        for handler in getattr(node, "handlers", []) or []:
            found += _module_level(handler.body)
    return found


def _binds(node: ast.stmt, name: str) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name == name
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return any((alias.asname or alias.name.split(".")[0]) == name for alias in node.names)
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(isinstance(sub, ast.Name) and sub.id == name for target in targets for sub in ast.walk(target))
    return False


def keyword_call_problem(path: str, keywords: tuple[str, ...], call: str) -> str | None:
    """Why `path` cannot be called with `keywords` (as `call` says), or None; read from its source only."""
    definition, problem = function_definition(path)
    if definition is None:
        return problem
    args = definition.args
    shown = f"{path}({ast.unparse(args)})"
    positional = [*args.posonlyargs, *args.args]
    defaults_from = len(positional) - len(args.defaults)
    named = {arg.arg for arg in [*args.args, *args.kwonlyargs]}
    for index, arg in enumerate(args.posonlyargs):
        if index < defaults_from:
            return f"{shown} cannot be called as {call}: '{arg.arg}' is positional-only"
    missing = [name for name in keywords if name not in named and args.kwarg is None]
    if missing:
        return f"{shown} cannot be called as {call}: it takes no {', '.join(repr(name) for name in missing)}"
    required = [arg.arg for index, arg in enumerate(positional) if index >= len(args.posonlyargs) and index < defaults_from]
    required += [arg.arg for arg, default in zip(args.kwonlyargs, args.kw_defaults) if default is None]
    unfilled = [name for name in required if name not in keywords]
    if unfilled:
        return f"{shown} cannot be called as {call}: it also needs {', '.join(repr(name) for name in unfilled)}"
    return None


REWARD_CALL = "reward(prompts=..., completions=..., completion_ids=..., <the data set's columns>=..., trainer_state=...)"


def reward_function_problem(path: str) -> str | None:
    """Why `path` cannot be a GRPO reward function (TRL calls it with keywords: the prompts, completions,
    completion ids, each column of the data set and the trainer's state), or None; read from source only."""
    definition, problem = function_definition(path)
    if definition is None:
        return problem
    if definition.args.kwarg is None:
        return (f"{path}({ast.unparse(definition.args)}) cannot be called as {REWARD_CALL}: it needs **kwargs for the "
                "keywords it does not name")
    args = definition.args
    required_positional = args.posonlyargs[:len([*args.posonlyargs, *args.args]) - len(args.defaults)]
    if required_positional:
        return f"{path}({ast.unparse(args)}) cannot be called as {REWARD_CALL}: '{required_positional[0].arg}' is positional-only"
    return None
