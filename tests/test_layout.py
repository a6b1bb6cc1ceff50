"""The code's layout as a contract: every project file a DVC stage runs is among that stage's deps, and no
function or module grows past what a reader can hold (pipeline/ only)."""

import ast
from pathlib import Path

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


def test_every_stage_depends_on_the_code_it_runs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(ENTRY)
    for stage, module in ENTRY.items():
        deps = [Path(d) for d in stages[stage]["deps"] if not str(d).startswith("${")]
        missing = sorted(str(f) for f in project_imports(f"pipeline.{module}")
                         if not any(f == d or d in f.parents for d in deps))
        assert not missing, f"dvc.yaml stage {stage!r} runs {missing} but does not list them in deps"
        assert Path("stages/launch.sh") in deps


def test_the_dependency_walk_sees_function_level_imports():
    """The check above can fail: evaluate imports the loop inside its function body."""
    files = project_imports("pipeline.evaluate")
    assert Path("pipeline/train/loop.py") in files and Path("pipeline/replay/pixels.py") in files


def test_functions_and_modules_stay_small():
    longest, largest = (0, ""), (0, "")
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        text = path.read_text()
        largest = max(largest, (len(text.splitlines()), str(path.relative_to(REPO))))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                longest = max(longest, (node.end_lineno - node.lineno + 1, f"{path.relative_to(REPO)}:{node.name}"))
    print(f"longest function {longest}, largest module {largest}")
    assert longest[0] <= 100, longest
    assert largest[0] <= 450, largest


def test_every_stage_explains_itself_on_help():
    import subprocess
    import sys

    for stage in (*ENTRY, "verify_cache", "export"):  # export: not a dvc.yaml stage (yet)
        proc = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--help", "run_seed=3"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = proc.stdout
        assert f"python -m pipeline.{stage}" in out and "Main keys" in out, out
        assert "${" not in out and "== Config ==" not in out  # resolved defaults, not Hydra's generic dump
        if stage == "teacher_cache":
            assert "run_seed               3" in out  # the defaults shown follow the overrides given
