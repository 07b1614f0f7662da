"""The fast lane's executor: statically pure programs (purity.py) one after another in one
jailed process, each kept from affecting the next by construction, not by the check alone.

Defence in depth, in the order a hostile program meets it:

1. The static check (purity.py) admits no attribute access but public `math.<name>`, no
   dunder names, no calls but pure builtins, and resolves names with CPython's own symbol
   table. A program it rejects runs in a fork of its own.
2. Each admitted program runs with *fresh* globals: a builtins mapping holding only the pure
   builtins (no `getattr`, `setattr`, `eval`, `open`, `globals`, `__build_class__`, and an
   `__import__` that can only return math), and `math` bound to a per-program copy of the
   module's public names. Nothing of the executor - its modules, its functions, the pipe its
   answers go to - is reachable from those globals, and what a program does to its own
   globals or its own math copy is thrown away with them.
3. After each program the executor checks, by identity, that the real `builtins` and `math`
   modules and its own code (this module, jail.py, purity.py, `ast`, `_symtable`: module
   dicts; functions' code, defaults, closures and globals; our classes' dicts; ast node
   classes' `_fields`) are unchanged (integrity_check). Any change
   means something got past (1) and (2): that program is answered "run me in a fork" (its
   own answer cannot be trusted) and the executor exits at once. The programs written
   behind it never started; the zygote hands them to a fresh executor.
"""
import ast
import builtins
import itertools
import json.decoder
import math
import operator
import os
import sys
import types

import _symtable

from . import jail as jail_mod
from . import purity

EXECUTOR_CPU_S = 3600  # it serves many programs; the zygote's wall clock bounds each of them
TAMPERED_EXIT = 3      # exit status after detected tampering (tests and logs tell it apart)

_HEAP_TYPE = 1 << 9   # Py_TPFLAGS_HEAPTYPE: a class whose attributes can be reassigned
_Namespace = types.SimpleNamespace
_MATH_PUBLIC = {name: value for name, value in vars(math).items() if not name.startswith("_")}
_PURE_BUILTINS = {name: getattr(builtins, name) for name in sorted(purity.PURE_BUILTINS)}
# The only import a pure program can make. Built with empty globals, so the function itself
# leads nowhere: its __globals__ holds nothing but an empty builtins mapping.
_IMPORT_FACTORY_SOURCE = '''
def make_import(view, refused):
    def __import__(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "math" and level == 0:
            return view
        raise refused(name)
    return __import__
'''


def _import_factory():
    namespace = {"__builtins__": {}}
    exec(_IMPORT_FACTORY_SOURCE, namespace)
    return namespace["make_import"]


def program_globals(make_import) -> dict:
    """Fresh globals for one program: pure builtins, a math copy of its own."""
    math_view = _Namespace(**_MATH_PUBLIC)
    program_builtins = dict(_PURE_BUILTINS)
    program_builtins["__import__"] = make_import(math_view, ImportError)
    return {"__name__": "__main__", "__builtins__": program_builtins, "math": math_view}


# ---- integrity of what programs must not change -----------------------------------------

def watched_modules():
    return [builtins, math, ast, _symtable, purity, jail_mod, sys.modules[__name__]]


def _mutable_class(value) -> bool:
    return isinstance(value, type) and bool(value.__flags__ & _HEAP_TYPE)


def integrity_check(modules, extra_dicts=()):
    """A function returning True while every watched object is as it was when this was
    called: the modules' dicts, their functions' code, defaults, closures and globals, the
    dicts of our own (mutable) classes, and `extra_dicts`. Of ast's node classes, whose
    `_fields` drive ast.walk in the purity check: the size of their dicts and `_fields`
    (a replaced or deleted entry changes one of the two). Identity comparisons only: a
    replacement object with a lying __eq__ is caught."""
    containers, functions, node_classes = list(extra_dicts), [], []
    for module in modules:
        containers.append(vars(module))
        for value in list(vars(module).values()):
            if isinstance(value, types.FunctionType):
                functions.append(value)
            elif _mutable_class(value) and issubclass(value, ast.AST):
                node_classes.append(value)
            elif _mutable_class(value) and value.__module__.startswith("megatron_reft"):
                containers.append(value.__dict__)
                functions += [v for v in vars(value).values()
                              if isinstance(v, types.FunctionType)]
    # All comparisons run in C (map/chain over the live objects): ~1,000 identities.
    values_of = operator.methodcaller("values")
    parts_of = operator.attrgetter("__code__", "__defaults__", "__kwdefaults__",
                                   "__closure__", "__globals__")
    dict_of, fields_of = operator.attrgetter("__dict__"), operator.attrgetter("_fields")
    containers, functions = tuple(containers), tuple(functions)
    node_classes = tuple(node_classes)
    sizes = tuple(map(len, containers)) + tuple(map(len, map(dict_of, node_classes)))
    keys = tuple(itertools.chain.from_iterable(containers))
    values = tuple(itertools.chain.from_iterable(map(values_of, containers)))
    parts = tuple(itertools.chain.from_iterable(map(parts_of, functions)))
    fields = tuple(map(fields_of, node_classes))
    is_, all_, map_, len_, tuple_ = operator.is_, all, map, len, tuple  # bound now
    chain = itertools.chain.from_iterable

    def intact() -> bool:
        return (tuple_(map_(len_, containers)) + tuple_(map_(len_, map_(dict_of, node_classes)))
                == sizes
                and all_(map_(is_, chain(containers), keys))
                and all_(map_(is_, chain(map_(values_of, containers)), values))
                and all_(map_(is_, chain(map_(parts_of, functions)), parts))
                and all_(map_(is_, map_(fields_of, node_classes), fields)))
    return intact


# ---- the serving loop --------------------------------------------------------------------

_WARM_UP = "def solution():\n    return round(math.sqrt(sum([x for x in range(3)])), 2)\n"


def executor_main(jail, request_fd: int, reply_fd: int):
    """Entry point of the executor child. Reads one JSON string (a program) per line on
    stdin, answers one line each on the result fd. Never returns. (Its programs see only
    math: a pure program cannot name any other preloaded module.)"""
    write, exit_, read = jail_mod._write, jail_mod._exit, os.read
    try:
        jail.enter(jail.devnull_fd, reply_fd, EXECUTOR_CPU_S, stdin_fd=request_fd)
    except BaseException:
        exit_(1)
    os.environ.clear()
    # Everything the loop calls is bound here, in this frame, before any program runs.
    pure_tree, run, encode = purity.pure_tree, jail_mod.run_program, jail_mod.encode_result
    scan_string = json.decoder.scanstring  # the C decoder: no mutable decoder object involved
    fork_instead, retire, result_fd = (jail_mod.FORK_INSTEAD, jail_mod.FORK_AND_RETIRE,
                                       jail_mod.RESULT_FD)
    make_import = _import_factory()
    run(pure_tree(_WARM_UP), program_globals(make_import))  # any lazily created state first
    intact = integrity_check(watched_modules(), (_MATH_PUBLIC, _PURE_BUILTINS))
    pending = b""
    while True:
        while b"\n" not in pending:
            chunk = read(0, 1 << 16)
            if not chunk:
                exit_(0)  # the zygote closed our stdin: retired
            pending += chunk
        line, pending = pending.split(b"\n", 1)
        tree = pure_tree(scan_string(line.decode("utf-8"), 1)[0])
        if tree is None:
            write(result_fd, fork_instead)
            continue
        status, value = run(tree, program_globals(make_import))
        # a MemoryError may come from what earlier programs left in this heap: retry fresh
        answer = fork_instead if status == "memory" else encode(status, value)
        if not intact():
            write(result_fd, retire)
            exit_(TAMPERED_EXIT)
        write(result_fd, answer)
