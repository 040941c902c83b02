"""Static audit: does this source run on Python 3.9 (the Python of Slicer 5.6 and 5.8)?

``ast.parse(..., feature_version=(3, 9))`` rejects 3.10+ grammar (``match``, ``except*``;
parenthesised context managers are accepted, as CPython 3.9's own parser accepts them); what the grammar allows but 3.9 fails on *at run time* is
looked for in the tree:

* ``X | Y`` of types outside annotations (isinstance/issubclass, casts, default values, aliases):
  an operand that is ``None``, a builtin type, a CamelCase name (a class by convention; ALL_CAPS
  constants such as ``os.O_CREAT`` are left alone) or a subscripted generic;
* ``|`` with a dict literal or ``dict(...)`` operand (dict union, PEP 584, is 3.9 but the house
  rule bans it to keep the engine simple to back-port);
* ``|`` inside an annotation of a module without ``from __future__ import annotations``;
* ``zip(..., strict=...)``, ``dataclass(slots=/kw_only=)`` (3.10);
* imports of names that are new in 3.10/3.11 (``tomllib``, ``itertools.pairwise``, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

BUILTIN_TYPES = {"int", "float", "str", "bool", "bytes", "list", "dict", "tuple", "set", "frozenset", "type",
                 "object", "complex", "bytearray"}
NEW_MODULES = {"tomllib"}  # 3.11
NEW_NAMES = {  # module -> names added after 3.9
    "itertools": {"pairwise"},
    "typing": {"TypeAlias", "ParamSpec", "Concatenate", "TypeGuard", "Self", "LiteralString", "Never",
               "TypeVarTuple", "Unpack", "assert_never", "reveal_type", "dataclass_transform"},
    "contextlib": {"chdir", "aclosing"},
    "enum": {"StrEnum"},
    "datetime": {"UTC"},
}


def _camel(identifier: str) -> bool:
    return identifier[:1].isupper() and not identifier.isupper()


def _is_type_like(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and node.value is None:
        return True
    if isinstance(node, ast.Name):
        return node.id in BUILTIN_TYPES or _camel(node.id)
    if isinstance(node, ast.Attribute):
        return _camel(node.attr)
    if isinstance(node, ast.Subscript):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _is_type_like(node.left) or _is_type_like(node.right)
    return False


def _annotation_nodes(tree: ast.AST) -> list:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            out.append(node.returns)
        elif isinstance(node, ast.arg) and node.annotation is not None:
            out.append(node.annotation)
        elif isinstance(node, ast.AnnAssign):
            out.append(node.annotation)
    return out


def problems_in_source(source: str, name: str = "<source>") -> list:
    """Sentences ``name:line: what`` for each 3.10+ construct found (empty: fine on 3.9)."""
    try:
        tree = ast.parse(source, filename=name, feature_version=(3, 9))
    except SyntaxError as exc:
        return [f"{name}:{exc.lineno}: not Python 3.9 grammar: {exc.msg}"]
    problems = []
    has_future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
                     for n in tree.body)
    in_annotation = set()
    for annotation in _annotation_nodes(tree):
        for sub in ast.walk(annotation):
            in_annotation.add(id(sub))
            if not has_future and isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.BitOr):
                problems.append(f"{name}:{sub.lineno}: 'X | Y' annotation without 'from __future__ import annotations'")
    for node in ast.walk(tree):
        if id(node) in in_annotation:
            continue
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            operands = (node.left, node.right)
            if any(_is_type_like(o) for o in operands):
                problems.append(f"{name}:{node.lineno}: 'X | Y' of types evaluated at run time (Python 3.10+); use a tuple or Optional")
            elif any(isinstance(o, (ast.Dict, ast.DictComp)) or (isinstance(o, ast.Call) and isinstance(o.func, ast.Name) and o.func.id == "dict")
                     for o in operands):
                problems.append(f"{name}:{node.lineno}: 'dict | dict'; use {{**a, **b}}")
        elif isinstance(node, ast.Call):
            func = node.func
            fname = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            keywords = {k.arg for k in node.keywords}
            if fname == "zip" and "strict" in keywords:
                problems.append(f"{name}:{node.lineno}: zip(strict=) is Python 3.10+")
            if fname == "dataclass" and keywords & {"slots", "kw_only", "match_args"}:
                problems.append(f"{name}:{node.lineno}: dataclass({', '.join(sorted(keywords & {'slots', 'kw_only', 'match_args'}))}=) is Python 3.10+")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in NEW_MODULES:
                    problems.append(f"{name}:{node.lineno}: module {alias.name} is Python 3.11+")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in NEW_MODULES:
                problems.append(f"{name}:{node.lineno}: module {node.module} is Python 3.11+")
            new = NEW_NAMES.get(node.module, set()) & {a.name for a in node.names}
            if new:
                problems.append(f"{name}:{node.lineno}: {node.module}.{', '.join(sorted(new))} is newer than Python 3.9")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.attr in NEW_NAMES.get(node.value.id, set()):
                problems.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr} is newer than Python 3.9")
    return problems


def problems_in_tree(root: Path) -> list:
    problems = []
    for path in sorted(Path(root).rglob("*.py")):
        problems += problems_in_source(path.read_text(encoding="utf-8"), str(path))
    return problems
