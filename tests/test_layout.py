"""The code's layout as a contract: every project file that decides a DVC stage's bytes is among that stage's deps
(itself, its room's folder or its room's contract file), rooms import downward only and without circles or each
other's private names, and no function or module grows past what a reader can hold."""

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENTRY = {"make_shards": "make_shards", "train_teacher": "train_teacher", "teacher_cache": "teacher_cache",
         "train_student": "train_student", "evaluate": "evaluate", "export": "export"}


def _module_file(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def project_imports(module: str) -> set[Path]:
    """Project files a module imports, transitively (any import statement, also inside functions)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        for pkg in (".".join(parts[:i]) for i in range(1, len(parts))):  # parent packages' __init__ run too
            todo.append(pkg)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.split(".")[0] == "pipeline"]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] == "pipeline":
                todo.append(node.module)
                todo += [f"{node.module}.{a.name}" for a in node.names]  # `from pipeline.x import module`
    return {p.relative_to(REPO) for p in seen}


# What decides no stage's bytes: the package, config checks and the CLI, logs, atomic writes, storage paths (web.py:
# http(s):// and hf:// reads, hash-checked against the manifest),
# torchrun plumbing, the writer lease, integrity checks and the audit of a finished store. Not deps of any stage.
PLUMBING = {f"pipeline/{n}.py" for n in ("version", "errors", "logs", "atomic", "storage", "storage_faults", "web",
                                          "config", "config_rules", "compose", "distributed", "finished", "cli",
                                          "launch", "params")} \
    | {f"pipeline/cache/{n}.py" for n in ("lease", "object_lease", "held_leases", "integrity", "audit")}
# A contract file stands for the code it covers: a change there that alters a stage's bytes bumps its version.
CONTRACTS = {"pipeline/replay/contract.py": ("pipeline/replay", "pipeline/data"),
             "pipeline/cache/contract.py": ("pipeline/cache/layout.py", "pipeline/cache/store.py",
                                            "pipeline/cache/provenance.py")}
# Imported by a stage, deciding none of its bytes there: the teacher trains a classification task (its module
# also holds the distillation task, which reads teacher targets); export reads the class names of the manifest,
# a dep itself.
NOT_ITS_BYTES = {"train_teacher": {"pipeline/cache/targets.py"},
                 "export": {"pipeline/data/shards.py", "pipeline/data/tar_samples.py", "pipeline/data/images.py"}}


def _covered(file: Path, deps: list[Path], stage: str) -> bool:
    def under(paths) -> bool:
        return any(file == Path(d) or Path(d) in file.parents for d in paths)

    return (under(deps) or str(file) in PLUMBING or file.name == "__init__.py"
            or str(file) in NOT_ITS_BYTES.get(stage, ())
            or any(under(covers) for contract, covers in CONTRACTS.items() if Path(contract) in deps))


def test_every_stage_depends_on_the_code_that_decides_its_bytes():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(ENTRY)
    for stage, module in ENTRY.items():
        deps = [Path(d) for d in stages[stage]["deps"] if not str(d).startswith("${")]
        assert all((REPO / d).exists() for d in deps), (stage, deps)
        assert Path(f"pipeline/{module}.py") in deps and Path("stages/launch.sh") in deps
        assert not any(str(d) in PLUMBING for d in deps), f"{stage}: plumbing listed as a dep"
        missing = sorted(str(f) for f in project_imports(f"pipeline.{module}") if not _covered(f, deps, stage))
        assert not missing, f"dvc.yaml stage {stage!r} runs {missing}: list them (or their room's contract) in deps"
    assert not _covered(Path("pipeline/replay/pixels.py"), [Path("pipeline/models")], "evaluate")  # it can fail


def test_the_dependency_walk_sees_function_level_imports():
    """The check above can fail: evaluate imports the loop inside its function body."""
    files = project_imports("pipeline.evaluate")
    assert Path("pipeline/train/loop.py") in files and Path("pipeline/replay/pixels.py") in files


def test_functions_and_modules_stay_small():
    longest, largest = (0, ""), (0, "")
    for path in sorted(p for room in ("pipeline", "bench", "hydra_plugins") for p in (REPO / room).rglob("*.py")):
        text = path.read_text()
        largest = max(largest, (len(text.splitlines()), str(path.relative_to(REPO))))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                longest = max(longest, (node.end_lineno - node.lineno + 1, f"{path.relative_to(REPO)}:{node.name}"))
    print(f"longest function {longest}, largest module {largest}")
    assert longest[0] <= 100, longest
    assert largest[0] <= 450, largest


@pytest.mark.slow
def test_every_stage_explains_itself_on_help():
    import subprocess
    import sys

    for stage in (*ENTRY, "verify_cache", "export", "push_cache"):  # export, push_cache: not dvc.yaml stages
        proc = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--help", "run_seed=3"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = proc.stdout
        assert f"python -m pipeline.{stage}" in out and "Main keys" in out, out
        assert "${" not in out and "== Config ==" not in out  # resolved defaults, not Hydra's generic dump
        if stage == "teacher_cache":
            assert "run_seed               3" in out  # the defaults shown follow the overrides given


# Rooms, lowest first: a module imports only from its own level or below. The base holds what every room uses
# (errors, logs, atomic writes, storage and web reads, the config schema); the entry level everything else at pipeline/'s top
# (pipeline/cli.py, pipeline/api.py and the stages).
BASE = {"pipeline", "pipeline.errors", "pipeline.logs", "pipeline.atomic", "pipeline.storage", "pipeline.storage_faults",
        "pipeline.web", "pipeline.version", "pipeline.config", "pipeline.config_rules", "pipeline.compose",
        "pipeline.distributed", "pipeline.finished"}
ROOMS = ("data", "replay", "models", "cache", "train")


def _level(module: str) -> int:
    parts = module.split(".")
    if module in BASE:
        return 0
    if len(parts) > 1 and parts[1] in ROOMS:
        return 1 + ROOMS.index(parts[1])
    return 1 + len(ROOMS)


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _imports(path: Path, roots=("pipeline", "bench")) -> list[tuple[str, str, int]]:
    """(module, name or "", line) of every project import in a file, at any depth; ``from m import x`` names the
    module m.x when x is one."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] in roots]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in roots:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub, "", node.lineno) if _module_file(sub) else (node.module, a.name, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): {m for m, _, _ in _imports(p) if _module_file(m)}
            for p in sorted((REPO / "pipeline").rglob("*.py"))}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    graph = _graph()
    assert "pipeline.cache.lease" in graph and graph["pipeline.cache.lease"]  # the walk sees the imports
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]  # and the check sees a circle
    assert _cycles(graph) == []


def test_rooms_import_downward_only():
    upward = [f"{src} (level {_level(src)}) imports {dst} (level {_level(dst)})"
              for src, targets in _graph().items() for dst in sorted(targets) if _level(dst) > _level(src)]
    assert _level("pipeline.config") < _level("pipeline.data.shards") < _level("pipeline.replay.loader") \
        < _level("pipeline.models.teacher") < _level("pipeline.cache.store") < _level("pipeline.train.loop") \
        < _level("pipeline.teacher_cache")
    assert not upward, "\n".join(upward)


def test_no_private_names_across_modules():
    """No module reaches into another's private names (``from m import _x`` or ``m._x``), in pipeline/ and bench/."""
    found = []
    for path in sorted([*(REPO / "pipeline").rglob("*.py"), *(REPO / "bench").rglob("*.py")]):
        imports = _imports(path)
        found += [f"{path.relative_to(REPO)}:{line}: {m}.{name}" for m, name, line in imports
                  if name.startswith("_") and not name.startswith("__")]
        modules = {}  # local name -> project module it is bound to
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                                if _module_file(f"{node.module}.{a.name}")})
            elif isinstance(node, ast.Import):
                modules.update({a.asname: a.name for a in node.names if a.asname and _module_file(a.name)})
        found += [f"{path.relative_to(REPO)}:{node.lineno}: {modules[node.value.id]}.{node.attr}"
                  for node in ast.walk(ast.parse(path.read_text()))
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in modules and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not found, "\n".join(found)
