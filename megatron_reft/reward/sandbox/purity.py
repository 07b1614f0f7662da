"""Which programs may share an interpreter: a conservative static check.

Forking a fresh child per program is what keeps one program from changing the next one's
result (rebinding math.pi, round, a module attribute). It also costs ~1.7 ms of CPU. Most
model-written programs are plain arithmetic on local variables; a program that provably can
only read `math`, call pure builtins and mutate its own local objects cannot leave anything
behind, so the worker runs such programs one after another in a single jailed executor
process (the same jail as a forked child) at a fraction of the cost. Everything else - and
anything this check is unsure about - still gets its own fork.

The check is an allowlist over the syntax tree: any node type, name, attribute or call not
listed below makes the program "not pure". It runs inside the jailed executor, never in the
zygote. This only decides *sharing*; what a program can do to the machine is decided by the
kernel jail either way.
"""
import ast

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
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    return tree if _pure_module(tree) else None


def is_pure(code: str) -> bool:
    return pure_tree(code) is not None


def _pure_module(tree: ast.Module) -> bool:
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    others = [n for n in tree.body if not isinstance(n, ast.FunctionDef)]
    if len(functions) != 1 or not all(_is_math_import(n) for n in others):
        return False
    function = functions[0]
    args = function.args
    if (function.name != "solution" or function.decorator_list or function.returns
            or args.args or args.posonlyargs or args.kwonlyargs or args.vararg or args.kwarg):
        return False
    assigned = _assigned_names(function)
    if "math" in assigned:  # `math.x` below must mean the module: it may not be rebound
        return False
    local_names = assigned | {"math"}
    nodes = [n for statement in function.body for n in ast.walk(statement)]
    return all(_allowed(node, local_names) for node in nodes)


def _is_math_import(node) -> bool:
    if isinstance(node, ast.Import):
        return all(alias.name == "math" for alias in node.names)
    if isinstance(node, ast.ImportFrom):
        return node.module == "math" and node.level == 0 and all(
            alias.name != "*" and not alias.name.startswith("_") for alias in node.names)
    return False


def _assigned_names(function: ast.FunctionDef) -> set:
    names = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.ImportFrom) or (isinstance(node, ast.Import)
                                                  and any(a.asname for a in node.names)):
            names |= {(alias.asname or alias.name) for alias in node.names}
    return names  # (a plain `import math` binds math to itself: not a rebinding)


def _allowed(node, local_names: set) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return _is_math_import(node)
    if not isinstance(node, _STATEMENTS + _EXPRESSIONS + _HELPERS):
        return False  # def, class, lambda, try, with, global, del, f-strings, starred, ...
    if isinstance(node, ast.Name):
        if node.id.startswith("__"):
            return False
        return isinstance(node.ctx, ast.Store) or node.id in local_names \
            or node.id in PURE_BUILTINS
    if isinstance(node, ast.Attribute):  # reading a public attribute of math, nothing else
        return (isinstance(node.ctx, ast.Load) and isinstance(node.value, ast.Name)
                and node.value.id == "math" and not node.attr.startswith("_"))
    if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
        return isinstance(node.value, ast.Name) and node.value.id in local_names
    if isinstance(node, ast.Call):  # the callee is checked as a Name / Attribute node
        return isinstance(node.func, (ast.Name, ast.Attribute)) and all(
            keyword.arg is not None for keyword in node.keywords)
    if isinstance(node, ast.Constant):
        return isinstance(node.value, _CONSTANT_TYPES)
    if isinstance(node, ast.comprehension):
        return not node.is_async
    return True
