"""The layering rules of DESIGN.md section 2, checked on a package's source text with ``ast``.

Nothing of the package is imported: every ``.py`` file under ``<source_root>/<package>`` is parsed, and each
``check_*`` function takes the source root and the package name, so the tests run the same
checks on tierflow and on small fake packages built in a temporary directory.

What counts as an import: ``import a.b`` and ``from a import b`` anywhere in a file (module level,
inside functions, under ``if TYPE_CHECKING:`` -- a type-only import is still a dependency on that
layer; declare a Protocol instead), ``from X import Y`` where ``X.Y`` is a module of the package
counting as importing ``X.Y``, relative imports resolved against the importing module, and
``importlib.import_module("...")`` / ``__import__("...")`` with a constant name. Running a
parent package's ``__init__`` as a side effect of an import is not counted.

The rules:

- layers: a layer is a subpackage (``tierflow.stages``) or a root module (``tierflow.config``);
  ``RANKS`` orders them and a layer may import only layers of lower rank, or itself. Layers of the
  same rank do not import each other, except the pairs in ``SAME_RANK_IMPORTS``: stages and convert
  are independent consumers of the tiers; pipeline has no model knowledge and adapters are pure
  forward functions that get what they need (a tracer, a device) passed in, so neither imports the
  other (none does today). The engine reads its config, so engine -> config is allowed; the CLI runs the server (`tierflow serve`), so cli -> server is too. A root
  module or subpackage that ``RANKS`` does not know gets the engine's rank, and is flagged by the
  root rule. Importing a module of the package that does not exist is flagged too.
- root: the package root holds only ``ROOT_MODULES`` (the public surface) and the subpackages
  named in ``RANKS``.
- pure: ``PURE_MODULES`` are bookkeeping on dataclasses. They import only the standard-library
  modules of ``PURE_STDLIB`` (an allow-list: a deny-list of I/O modules could never be complete)
  and other pure modules of the package; they call none of ``PURE_BANNED_CALLS`` and have no
  ``async`` or ``await``. So no torch, no ``os``/``pathlib``/``json``/``tempfile``/``io``, no ``open``.
  ``tierflow.errors`` and ``tierflow.outputs`` are declared pure too, since pure modules use them.
- adapters-io: ``tierflow.adapters`` does no I/O: it imports none of ``IO_MODULES`` (nor
  ``tierflow.tiers``, which the layers rule already forbids) and calls none of ``IO_CALLS``.
- exceptions: every exception class is defined in ``<package>/errors.py``. A class is an exception
  when a base is a builtin exception, an exception class of the package (followed through imports
  and re-exports), an exception of a standard-library module, or -- for third-party bases, which
  are not imported -- a name ending in Error, Exception or Warning.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

# layer (relative to the package; "" is its __init__) -> rank; lower ranks may not import higher.
RANKS: Mapping[str, int] = {
    "errors": 0, "outputs": 0,
    "pipeline": 1, "adapters": 1,
    "tiers": 2,
    "stages": 3, "convert": 3,
    "engine": 4, "config": 4,
    "cli": 5, "testing": 5, "server": 5, "": 5,
}
SAME_RANK_IMPORTS = frozenset({("engine", "config"), ("cli", "server")})  # (importing layer, imported layer)
ROOT_MODULES = frozenset({"__init__", "config", "errors", "outputs", "testing"})

PURE_MODULES = ("tiers.plan", "tiers.kv.layout", "tiers.kv.pool", "pipeline.batcher", "pipeline.kv_fit", "pipeline.sweep_plan", "errors",
                "outputs")  # a name or a package prefix
PURE_STDLIB = frozenset({"__future__", "abc", "bisect", "collections", "dataclasses", "enum", "fractions",
                         "functools", "heapq", "itertools", "math", "numbers", "operator", "re", "statistics",
                         "types", "typing"})
PURE_BANNED_CALLS = frozenset({"open", "print", "input", "__import__", "exec", "eval"})

IO_MODULES = frozenset({"os", "pathlib", "json", "io", "tempfile", "shutil", "glob", "pickle", "shelve",
                        "sqlite3", "mmap", "socket", "subprocess", "urllib", "http", "safetensors",
                        "huggingface_hub", "requests"})
IO_CALLS = frozenset({"open", "torch.load", "torch.save", "torch.from_file"})


@dataclass(frozen=True, slots=True)
class Module:
    name: str           # dotted: tierflow.stages.prefix
    rel: str            # relative to the package: stages.prefix ("" for the package's __init__)
    path: str           # relative to the source root, with forward slashes
    is_package: bool    # an __init__.py
    tree: ast.Module


@dataclass(frozen=True, slots=True)
class Import:
    target: str         # the dotted module imported
    line: int


@dataclass(frozen=True, slots=True)
class Violation:
    rule: str           # layers, root, pure, adapters-io or exceptions
    path: str           # the offending file, relative to the source root
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.message}"


def load_package(source_root: Path, package: str) -> dict[str, Module]:
    """Every module of ``package`` under ``source_root``, parsed, by dotted name."""
    modules: dict[str, Module] = {}
    for file in sorted((Path(source_root) / package).rglob("*.py")):
        parts = file.relative_to(source_root).with_suffix("").parts
        if any(part.startswith((".", "__pycache__")) for part in parts):
            continue
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        modules[name] = Module(name, name[len(package) + 1:], file.relative_to(source_root).as_posix(),
                               is_package, tree)
    return modules


def module_imports(module: Module, modules: Mapping[str, Module]) -> list[Import]:
    """Every module ``module`` imports, anywhere in its file."""
    found: list[Import] = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node)
            names = [f"{base}.{alias.name}" for alias in node.names]
            found += [Import(name if name in modules else base, node.lineno) for name in names]
        elif isinstance(node, ast.Call) and _dotted(node.func) in ("importlib.import_module", "import_module",
                                                                   "__import__"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append(Import(node.args[0].value, node.lineno))
    return list(dict.fromkeys(found))       # one per module and line: `from X import a, b` is one import of X


def check_layers(source_root: Path, package: str) -> list[Violation]:
    modules = load_package(source_root, package)
    found = []
    for module in modules.values():
        for imp in module_imports(module, modules):
            if imp.target != package and not imp.target.startswith(package + "."):
                continue
            if imp.target not in modules:
                found.append(Violation("layers", module.path, imp.line,
                                       f"{module.name} imports {imp.target}, which is not a module of {package}"))
                continue
            problem = _layer_problem(layer_of(module.rel), layer_of(modules[imp.target].rel))
            if problem:
                found.append(Violation("layers", module.path, imp.line,
                                       f"{module.name} imports {imp.target}: {problem}"))
    return found


def check_root(source_root: Path, package: str) -> list[Violation]:
    found, placed = [], set()
    for module in load_package(source_root, package).values():
        top, _, rest = module.rel.partition(".")
        if not top or top in placed:
            continue
        if not rest and not module.is_package and top not in ROOT_MODULES:
            found.append(Violation("root", module.path, 1, f"{module.name} sits at the package root, which holds "
                                   f"only {', '.join(sorted(ROOT_MODULES))}; move it into its layer"))
        elif (rest or module.is_package) and top not in RANKS:
            placed.add(top)
            found.append(Violation("root", module.path, 1, f"{package}.{top} is a subpackage that RANKS does not "
                                   f"place; give it a rank in tests/layering.py"))
    return found


def check_purity(source_root: Path, package: str) -> list[Violation]:
    modules = load_package(source_root, package)
    found = []
    for module in modules.values():
        if _is_pure(module.rel):
            found += _pure_problems(module, modules, package)
        if layer_of(module.rel) == "adapters":
            found += _adapter_io_problems(module, modules)
    return found


def check_exceptions(source_root: Path, package: str) -> list[Violation]:
    modules = load_package(source_root, package)
    bindings = {name: _bindings(module) for name, module in modules.items()}
    classes = {f"{name}.{node.name}": (module, node) for name, module in modules.items()
               for node in ast.walk(module.tree) if isinstance(node, ast.ClassDef)}
    verdicts: dict[str, bool] = {}

    def is_exception(qualname: str) -> bool:
        qualname = _follow_reexports(qualname, bindings)
        if qualname not in verdicts:
            verdicts[qualname] = False          # a cycle of bases is not an exception
            if qualname in classes:
                module, node = classes[qualname]
                verdicts[qualname] = any(is_exception(base) for base in _bases(node, bindings[module.name]))
            else:
                verdicts[qualname] = _external_exception(qualname)
        return verdicts[qualname]

    found = []
    for qualname, (module, node) in classes.items():
        if module.rel != "errors" and is_exception(qualname):
            found.append(Violation("exceptions", module.path, node.lineno,
                                   f"class {node.name}({', '.join(map(ast.unparse, node.bases))}) is an exception: "
                                   f"define it in {package}/errors.py"))
    return found


def check_package(source_root: Path, package: str) -> list[Violation]:
    """All the rules; sorted by file and line."""
    found = (check_layers(source_root, package) + check_root(source_root, package)
             + check_purity(source_root, package) + check_exceptions(source_root, package))
    return sorted(found, key=lambda v: (v.path, v.line, v.rule, v.message))


def layer_of(rel: str) -> str:
    return rel.partition(".")[0]


def _layer_problem(src: str, dst: str) -> str | None:
    # an unplaced layer (flagged by the root rule) is ranked as part of the engine
    src_key, dst_key = (name if name in RANKS else "engine" for name in (src, dst))
    if src_key == dst_key:
        return None
    src_rank, dst_rank = RANKS[src_key], RANKS[dst_key]
    if src_rank < dst_rank:
        return f"layer {_shown(src)} (rank {src_rank}) imports upward into {_shown(dst)} (rank {dst_rank})"
    if src_rank == dst_rank and (src_key, dst_key) not in SAME_RANK_IMPORTS:
        return f"layers {_shown(src)} and {_shown(dst)} share rank {src_rank} and stay independent"
    return None


def _shown(layer: str) -> str:
    if not layer:
        return "__init__"
    return layer if layer in RANKS else f"unplaced {layer}"


def _is_pure(rel: str) -> bool:
    return any(rel == p or rel.startswith(p + ".") for p in PURE_MODULES)


def _pure_problems(module: Module, modules: Mapping[str, Module], package: str) -> list[Violation]:
    found = []
    for imp in module_imports(module, modules):
        if imp.target in modules:
            if not _is_pure(modules[imp.target].rel):
                found.append(Violation("pure", module.path, imp.line, f"{module.name} is pure but imports "
                                       f"{imp.target}, which is not (PURE_MODULES in tests/layering.py)"))
        elif not imp.target.startswith(package + ".") and not _within(imp.target, PURE_STDLIB):
            found.append(Violation("pure", module.path, imp.line, f"{module.name} is pure but imports "
                                   f"{imp.target} (allowed: PURE_STDLIB in tests/layering.py)"))
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Call) and _dotted(node.func) in PURE_BANNED_CALLS:
            found.append(Violation("pure", module.path, node.lineno,
                                   f"{module.name} is pure but calls {_dotted(node.func)}()"))
        elif isinstance(node, (ast.AsyncFunctionDef, ast.Await, ast.AsyncFor, ast.AsyncWith)):
            found.append(Violation("pure", module.path, node.lineno,
                                   f"{module.name} is pure but has async code ({type(node).__name__})"))
    return found


def _adapter_io_problems(module: Module, modules: Mapping[str, Module]) -> list[Violation]:
    found = [Violation("adapters-io", module.path, imp.line, f"{module.name} imports {imp.target}: adapters do no I/O")
             for imp in module_imports(module, modules) if _within(imp.target, IO_MODULES)]
    found += [Violation("adapters-io", module.path, node.lineno,
                        f"{module.name} calls {_dotted(node.func)}(): adapters do no I/O")
              for node in ast.walk(module.tree) if isinstance(node, ast.Call) and _dotted(node.func) in IO_CALLS]
    return found


def _within(name: str, roots: frozenset[str]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def _from_base(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.name.split(".")
    keep = len(parts) - node.level + (1 if module.is_package else 0)
    return ".".join(parts[:max(keep, 0)] + ([node.module] if node.module else []))


def _dotted(node: ast.expr) -> str:
    """``a.b.c`` for a chain of attributes on a name; "" for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else ""
    return ""


def _bindings(module: Module) -> dict[str, str]:
    """Local name -> what it names, for the imports and classes of ``module``."""
    names: dict[str, str] = {}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.partition(".")[0]] = alias.name if alias.asname else \
                    alias.name.partition(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node)
            names.update({alias.asname or alias.name: f"{base}.{alias.name}" for alias in node.names})
        elif isinstance(node, ast.ClassDef):
            names[node.name] = f"{module.name}.{node.name}"
    return names


def _bases(node: ast.ClassDef, names: Mapping[str, str]) -> Iterator[str]:
    for base in node.bases:
        dotted = _dotted(base.value if isinstance(base, ast.Subscript) else base)
        if dotted:
            head, _, rest = dotted.partition(".")
            resolved = names.get(head, f"builtins.{head}" if hasattr(builtins, head) else head)
            yield f"{resolved}.{rest}" if rest else resolved


def _follow_reexports(qualname: str, bindings: Mapping[str, Mapping[str, str]]) -> str:
    """Where ``module.Name`` was defined, following ``from elsewhere import Name`` in ``module``."""
    seen = set()
    while qualname not in seen:
        seen.add(qualname)
        module, _, name = qualname.rpartition(".")
        target = bindings.get(module, {}).get(name)
        if target is None or target == qualname:
            return qualname
        qualname = target
    return qualname


def _external_exception(qualname: str) -> bool:
    module, _, name = qualname.rpartition(".")
    if module == "builtins" or module.partition(".")[0] in sys.stdlib_module_names:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            found = None
        return isinstance(found, type) and issubclass(found, BaseException)
    return name.endswith(("Error", "Exception", "Warning"))
