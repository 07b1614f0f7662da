"""Which programs may share an interpreter: a conservative static check.

Forking a fresh child per program is what keeps one program from changing the next one's
result (rebinding math.pi, round, a module attribute). It also costs ~1.7 ms of CPU. Most
model-written programs are plain arithmetic on local variables; a program that provably can
only read `math`, call pure builtins and mutate its own local objects cannot leave anything
behind, so the worker runs such programs one after another in a single jailed executor
process (the same jail as a forked child) at a fraction of the cost. Everything else - and
anything this check is unsure about - still gets its own fork.

The check is an allowlist over the syntax tree: any node type, name, attribute or call not
listed below makes the program "not pure". Which object a name means is decided by CPython's
own symbol table (`_symtable`, the pass the compiler runs), not by re-implementing Python's
scoping rules here: a comprehension is a scope of its own (so `[setattr for setattr in ()]`
does not make a later `setattr` local), its first iterable and a `:=` inside it belong to the
enclosing function. Every name that resolves to a global must be a pure builtin, `math`, or a
name the program's own module-level `from math import ...` binds. It runs inside the jailed
executor, never in the zygote. This only decides *sharing*; what a program can do to the
machine is decided by the kernel jail either way, and the executor (executor.py) adds its
own run-time guards on top of this check.
"""
import ast
import _symtable  # CPython's symbol-table pass: scopes exactly as the compiler will see them

# Builtins without side effects or access to other objects' internals. Not: print, open,
# getattr/setattr, vars, globals, type, object, __import__, eval/exec, iter/next, isinstance.
PURE_BUILTINS = frozenset({
    "abs", "all", "any", "bool", "complex", "dict", "divmod", "enumerate", "float", "int",
    "len", "list", "max", "min", "pow", "range", "reversed", "round", "set", "sorted", "str",
    "sum", "tuple", "zip",
})
_STATEMENTS = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return, ast.If, ast.For,
               ast.While, ast.Break, ast.Continue, ast.Pass, ast.Expr, ast.Import, ast.ImportFrom)
_EXPRESSIONS = (ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.IfExp, ast.Call,
                ast.Constant, ast.Name, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.Subscript,
                ast.Slice, ast.Attribute, ast.ListComp, ast.SetComp, ast.DictComp,
                ast.GeneratorExp, ast.NamedExpr)
_HELPERS = (ast.comprehension, ast.keyword, ast.alias, ast.Load, ast.Store,
            ast.boolop, ast.operator, ast.unaryop, ast.cmpop)
_CONSTANT_TYPES = (int, float, complex, str, bool, type(None))


def pure_tree(code: str):
    """The parsed program when `code` is `def solution(): ...` (plus optional `import math`)
    built only from allowed parts, else None. Any parse problem means None: the fork path will
    report the error."""
    try:
        tree = ast.parse(code)
        nodes = _pure_nodes(tree)
        return tree if nodes is not None and _pure_scopes(code, tree, nodes) else None
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def is_pure(code: str) -> bool:
    return pure_tree(code) is not None


def _pure_nodes(tree: ast.Module):
    """The nodes of solution's body if the module's shape and every node are allowed."""
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    others = [n for n in tree.body if not isinstance(n, ast.FunctionDef)]
    if len(functions) != 1 or not all(_is_math_import(n) for n in others):
        return None
    function = functions[0]
    args = function.args
    if (function.name != "solution" or function.decorator_list or function.returns
            or args.args or args.posonlyargs or args.kwonlyargs or args.vararg or args.kwarg):
        return None
    nodes = [n for statement in function.body for n in ast.walk(statement)]
    if _rebinds_math(others + nodes):  # `math.x` must mean the module
        return None
    return nodes if all(_allowed(node) for node in nodes) else None


_SCOPE_OFF, _SCOPE_MASK = _symtable.SCOPE_OFF, _symtable.SCOPE_MASK
_GLOBAL_SCOPES = (_symtable.GLOBAL_IMPLICIT, _symtable.GLOBAL_EXPLICIT)
_LOCAL_SCOPES = (_symtable.LOCAL, _symtable.CELL)


def _pure_scopes(code: str, tree: ast.Module, nodes) -> bool:
    """Resolve every name as CPython will: a name that is global in `solution` or in any
    comprehension inside it must mean math, a pure builtin or a module-level math import;
    an item assignment `x[i] = ...` must target a local of `solution`."""
    module_table = _symtable.symtable(code, "<program>", "exec")
    allowed_globals = PURE_BUILTINS | {"math"} | _module_bindings(tree)
    solution_table, = module_table.children  # exactly one function, checked before
    for table in _tables(solution_table):
        for name, flags in table.symbols.items():
            scope = (flags >> _SCOPE_OFF) & _SCOPE_MASK
            if scope in _GLOBAL_SCOPES and name not in allowed_globals:
                return False  # (a local `math` can only be `import math`: _rebinds_math)
    solution_locals = {name for name, flags in solution_table.symbols.items()
                       if (flags >> _SCOPE_OFF) & _SCOPE_MASK in _LOCAL_SCOPES}
    return all(node.value.id in solution_locals for node in nodes
               if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store))


def _tables(table):
    yield table
    for child in table.children:
        yield from _tables(child)


def _module_bindings(tree: ast.Module) -> set:
    """Names the program's own module-level math imports bind (to math or its attributes)."""
    return {(alias.asname or alias.name) for node in tree.body
            if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}


def _is_math_import(node) -> bool:
    if isinstance(node, ast.Import):
        return all(alias.name == "math" for alias in node.names)
    if isinstance(node, ast.ImportFrom):
        return node.module == "math" and node.level == 0 and all(
            alias.name != "*" and not alias.name.startswith("_") for alias in node.names)
    return False


def _rebinds_math(nodes) -> bool:
    """Anything among `nodes` that binds the name math to something other than the module (a
    plain `import math` binds it to the module itself: not a rebinding)."""
    for node in nodes:
        if isinstance(node, ast.Name) and node.id == "math" and not isinstance(node.ctx, ast.Load):
            return True
        if isinstance(node, ast.ImportFrom) and any(
                (alias.asname or alias.name) == "math" for alias in node.names):
            return True
        if isinstance(node, ast.Import) and any(alias.asname == "math" for alias in node.names):
            return True
    return False


def _allowed(node) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return _is_math_import(node)
    if not isinstance(node, _STATEMENTS + _EXPRESSIONS + _HELPERS):
        return False  # def, class, lambda, try, with, global, del, f-strings, starred, ...
    if isinstance(node, ast.Name):  # what it refers to is checked in _pure_scopes
        return not node.id.startswith("__")
    if isinstance(node, ast.Attribute):  # reading a public attribute of math, nothing else
        return (isinstance(node.ctx, ast.Load) and isinstance(node.value, ast.Name)
                and node.value.id == "math" and not node.attr.startswith("_"))
    if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
        return isinstance(node.value, ast.Name)  # a local of solution: _pure_scopes
    if isinstance(node, ast.Call):  # the callee is checked as a Name / Attribute node
        return isinstance(node.func, (ast.Name, ast.Attribute)) and all(
            keyword.arg is not None for keyword in node.keywords)
    if isinstance(node, ast.Constant):
        return isinstance(node.value, _CONSTANT_TYPES)
    if isinstance(node, ast.comprehension):
        return not node.is_async
    return True
