"""Read an InternEvo-style config file: a python file of plain assignments.

The file is never executed. Its AST is walked and only what InternEvo's config files
use is evaluated: literals, names assigned earlier in the file, f-strings, arithmetic,
comparisons, ``a if c else b``, subscripts (``data["total_steps"]``) and calls of a
few pure builtins (``dict(...)``, ``int(...)``...), so a config cannot import or run
anything.
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
_COMPARE = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_, ast.IsNot: operator.is_not,
}
# Pure builtins a config may call; dict(...) is handled apart for its keyword form.
_FUNCTIONS = {
    f.__name__: f for f in (int, float, str, bool, round, abs, min, max, len, sum, list, tuple, sorted)
}
_CONVERSIONS = {-1: lambda v: v, ord("s"): str, ord("r"): repr, ord("a"): ascii}


class _Evaluator:
    def __init__(self, where: str) -> None:
        self.where = where
        self.names: dict[str, Any] = {}

    def fail(self, node: ast.AST, message: str) -> ConfigError:
        return ConfigError(f"{self.where}:{getattr(node, 'lineno', '?')}: {message}")

    def value(self, node: ast.AST) -> Any:
        try:
            return self._value(node)
        except ConfigError:
            raise
        except Exception as exc:  # a TypeError, KeyError, ZeroDivisionError... of the file's own expression
            raise self.fail(node, f"cannot evaluate {ast.unparse(node)!r}: {type(exc).__name__}: {exc}") from None

    def _value(self, node: ast.AST) -> Any:
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
            return _BINARY[type(node.op)](self.value(node.left), self.value(node.right))
        if isinstance(node, ast.BoolOp):
            return self.bool_op(node)
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            return self.compare(node)
        if isinstance(node, ast.IfExp):
            return self.value(node.body) if self.value(node.test) else self.value(node.orelse)
        if isinstance(node, ast.JoinedStr):
            return "".join(self.value(part) for part in node.values)
        if isinstance(node, ast.FormattedValue):
            spec = self.value(node.format_spec) if node.format_spec is not None else ""
            return format(_CONVERSIONS[node.conversion](self.value(node.value)), spec)
        if isinstance(node, ast.Subscript):
            return self.value(node.value)[self.value(node.slice)]
        if isinstance(node, ast.Slice):
            return slice(*(self.value(p) if p is not None else None for p in (node.lower, node.upper, node.step)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (*_FUNCTIONS, "dict"):
            return self.call(node)
        raise self.fail(node, f"unsupported expression {ast.unparse(node)!r}; use literals, names assigned above, "
                              f"f-strings, arithmetic, comparisons, subscripts and calls of dict, {', '.join(_FUNCTIONS)}")

    def bool_op(self, node: ast.BoolOp) -> Any:
        result = None
        for operand in node.values:  # short-circuits like python
            result = self.value(operand)
            if isinstance(node.op, ast.And) != bool(result):
                return result
        return result

    def compare(self, node: ast.Compare) -> bool:
        left = self.value(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = self.value(comparator)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True

    def call(self, node: ast.Call) -> Any:
        name = node.func.id
        if any(isinstance(a, ast.Starred) for a in node.args) or any(kw.arg is None for kw in node.keywords):
            raise self.fail(node, "'*' / '**' unpacking is not supported in config files")
        args = [self.value(a) for a in node.args]
        if name == "dict":
            if len(args) > 1:
                raise self.fail(node, "dict(...) takes at most one positional argument")
            out = dict(args[0]) if args else {}
            out.update((kw.arg, self.value(kw.value)) for kw in node.keywords)
            return out
        return _FUNCTIONS[name](*args, **{kw.arg: self.value(kw.value) for kw in node.keywords})

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
