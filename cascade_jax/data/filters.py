"""The official ``dataset_filters``, evaluated without ``eval``.

The official configs write filters as ``[key, "lambda w: w >= 768"]`` (a list of keys for a
lambda of several arguments) and ``eval`` the string; a sample passes when every filter returns
true on its JSON metadata, and fails when a key is missing or a filter raises. Here the lambda is
parsed with :mod:`ast` and interpreted over a small whitelist (comparisons, boolean and arithmetic
operators, constants, subscripts, ``len/abs/min/max/int/float/str/bool``), so a config cannot run
code. Short forms such as ``"width>=768"`` or ``"aesthetic > 5.5"`` are accepted too.
"""

from __future__ import annotations

import ast
import operator
import re
from typing import Any, Callable

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
            ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not}
_FUNCTIONS = {"len": len, "abs": abs, "min": min, "max": max, "int": int, "float": float, "str": str, "bool": bool}
_SHORT_FORM = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")


class MetadataFilter:
    """All filters of a config; ``filter(metadata) -> bool`` (False when a key is missing)."""

    def __init__(self, specs):
        self.rules = [_parse_rule(spec) for spec in specs]

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __call__(self, metadata: dict) -> bool:
        for keys, fn, _ in self.rules:
            try:
                if not fn(*[metadata[k] for k in keys]):
                    return False
            except (KeyError, TypeError, ValueError, ZeroDivisionError, ArithmeticError):
                return False  # as the official MultiFilter: a sample the rule cannot judge is dropped
        return True

    def keys(self) -> set[str]:
        return {k for keys, _, _ in self.rules for k in keys}


def _parse_rule(spec) -> tuple[tuple[str, ...], Callable, str]:
    if isinstance(spec, str):
        match = _SHORT_FORM.match(spec)
        if not match:
            raise ValueError(f"filter {spec!r} is not of the form 'key>=value' (operators >= <= == != > <)")
        key, op, value = match.groups()
        return (key,), _short_form(op, _literal(value, spec)), spec
    if isinstance(spec, (list, tuple)) and len(spec) == 2 and isinstance(spec[1], str):
        keys = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])
        return keys, compile_lambda(spec[1], len(keys)), spec[1]
    raise ValueError(f"filter {spec!r} is neither [key, 'lambda x: ...'] (official form) nor 'key>=value'")


def _literal(text: str, spec: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if re.fullmatch(r"[\w.\-]+", text):
            return text  # a bare word compares as a string: "source==laion"
        raise ValueError(f"filter {spec!r}: {text!r} is not of the form 'key>=value' with a number, "
                         f"a quoted string or a bare word as the value") from None


def _short_form(op: str, value) -> Callable:
    compare = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
               ">": operator.gt, "<": operator.lt}[op]
    return lambda x: compare(x, value)


def compile_lambda(source: str, n_args: int) -> Callable:
    """A callable from ``"lambda a, b: expr"``, interpreted over the whitelist (no ``eval``)."""
    try:
        tree = ast.parse(source.strip(), mode="eval").body
    except SyntaxError as err:
        raise ValueError(f"filter {source!r} is not valid Python: {err.msg}") from None
    if not isinstance(tree, ast.Lambda):
        raise ValueError(f"filter {source!r} must be a lambda, as in the official configs ('lambda w: w >= 768')")
    names = [a.arg for a in tree.args.args]
    if len(names) != n_args or tree.args.vararg or tree.args.kwarg or tree.args.kwonlyargs:
        raise ValueError(f"filter {source!r} takes {len(names)} plain arguments; its keys give {n_args}")
    _check(tree.body, set(names), source)
    body = tree.body
    return lambda *args: _evaluate(body, dict(zip(names, args)))


def _check(node: ast.AST, names: set[str], source: str) -> None:
    """Reject anything outside the whitelist up front, so a bad filter fails at start-up."""
    allowed = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd,
               ast.BinOp, ast.Compare, ast.Constant, ast.Name, ast.Load, ast.Call, ast.Subscript,
               ast.IfExp, ast.Tuple, ast.List, *_BINARY, *_COMPARE)
    for child in ast.walk(node):
        if not isinstance(child, allowed):
            raise ValueError(f"filter {source!r} uses {type(child).__name__}, which filters may not use")
        if isinstance(child, ast.Name) and child.id not in names and child.id not in _FUNCTIONS \
                and child.id not in ("True", "False", "None"):
            raise ValueError(f"filter {source!r} names {child.id!r}, which is neither an argument nor one of "
                             f"{', '.join(sorted(_FUNCTIONS))}")
        if isinstance(child, ast.Call) and (not isinstance(child.func, ast.Name) or child.keywords):
            raise ValueError(f"filter {source!r} may only call {', '.join(sorted(_FUNCTIONS))} positionally")


def _evaluate(node: ast.AST, env: dict[str, Any]):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return env[node.id] if node.id in env else _FUNCTIONS[node.id]
    if isinstance(node, ast.BoolOp):
        values = (_evaluate(v, env) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, env)
        return {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos}[type(node.op)](value)
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_evaluate(node.left, env), _evaluate(node.right, env))
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, env)
        for op, right_node in zip(node.ops, node.comparators):
            right = _evaluate(right_node, env)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Call):
        return _evaluate(node.func, env)(*[_evaluate(a, env) for a in node.args])
    if isinstance(node, ast.Subscript):
        return _evaluate(node.value, env)[_evaluate(node.slice, env)]
    if isinstance(node, ast.IfExp):
        return _evaluate(node.body, env) if _evaluate(node.test, env) else _evaluate(node.orelse, env)
    if isinstance(node, (ast.Tuple, ast.List)):
        return [_evaluate(e, env) for e in node.elts]
    raise ValueError(f"filter node {type(node).__name__} is not supported")  # _check rules this out
