"""Read an InternEvo-style config file: a python file of plain assignments.

The file is never executed. Its AST is walked and only literals, names assigned
earlier in the file, ``dict(...)`` calls and arithmetic are evaluated, so a config
cannot import or run anything.
"""

from __future__ import annotations

import ast
import operator
from pathlib import Path
from typing import Any

from .errors import ConfigError

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_CONSTRUCTORS = {"dict": dict, "list": list, "tuple": tuple}


class _Evaluator:
    def __init__(self, where: str) -> None:
        self.where = where
        self.names: dict[str, Any] = {}

    def fail(self, node: ast.AST, message: str) -> ConfigError:
        return ConfigError(f"{self.where}:{getattr(node, 'lineno', '?')}: {message}")

    def value(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return self.names[node.id]
            raise self.fail(node, f"name {node.id!r} is not defined earlier in the file")
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [self.value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise self.fail(node, "'**' unpacking is not supported in config files")
            return {self.value(k): self.value(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](self.value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            try:
                return _BINARY[type(node.op)](self.value(node.left), self.value(node.right))
            except Exception as exc:
                raise self.fail(node, f"cannot evaluate expression: {exc}") from None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CONSTRUCTORS:
            return self.call(node)
        raise self.fail(node, f"unsupported expression {ast.unparse(node)!r}; use literals, dict(...) and arithmetic")

    def call(self, node: ast.Call) -> Any:
        name = node.func.id
        if name == "dict":
            if len(node.args) > 1:
                raise self.fail(node, "dict(...) takes at most one positional argument")
            out = dict(self.value(node.args[0])) if node.args else {}
            for kw in node.keywords:
                if kw.arg is None:
                    raise self.fail(node, "'**' unpacking is not supported in config files")
                out[kw.arg] = self.value(kw.value)
            return out
        if node.keywords or len(node.args) > 1:
            raise self.fail(node, f"{name}(...) takes one positional argument")
        return _CONSTRUCTORS[name](self.value(node.args[0]) if node.args else ())

    def statement(self, node: ast.stmt) -> None:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return  # a docstring or bare string
        if isinstance(node, ast.Assign):
            value = self.value(node.value)
            for target in node.targets:
                if not isinstance(target, ast.Name):
                    raise self.fail(node, f"only simple 'name = value' assignments are allowed, not {ast.unparse(target)!r}")
                self.names[target.id] = value
            return
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            self.names[node.target.id] = self.value(node.value)
            return
        kind = type(node).__name__.lower()
        raise self.fail(node, f"only assignments are allowed in a config file (found {kind!r})")


def parse_config_text(text: str, where: str = "<config>") -> dict[str, Any]:
    """All names assigned by the config source ``text``, in file order."""
    try:
        tree = ast.parse(text, filename=where)
    except SyntaxError as exc:
        raise ConfigError(f"{where}:{exc.lineno}: invalid python syntax: {exc.msg}") from None
    evaluator = _Evaluator(where)
    for node in tree.body:
        evaluator.statement(node)
    return evaluator.names


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    return parse_config_text(text, str(path))
