"""The built wheel works outside the checkout: its configuration is package data, every third-party import it makes
is a declared dependency, and the toy stages run from an unrelated directory with the checkout not importable.

The wheel is built from the tracked files only (a copy, so nothing lands in the checkout), installed with --no-deps
into a fresh venv; that venv reaches the dependencies already installed here through one .pth line naming this
interpreter's site-packages (a .pth line adds a directory to sys.path without running the .pth files in it, so the
editable install of the checkout stays out)."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from readme_blocks import blocks, copy_checkout

REPO = Path(__file__).resolve().parents[1]
# Tiny caps: the point is that each stage starts, finds its config and writes its output, not what it learns.
TINY = ["data.train_size=128", "data.val_size=64", "data.shard_size=64", "teacher.train.epochs=1",
        "cache.num_seeds=1", "cache.num_workers=0", "train.epochs=1", "train.num_workers=0",
        "++student.kwargs.depth=1", "train.max_steps_per_epoch=2"]

# Run inside the installed venv: every import in the installed package, mapped to the distribution providing it,
# must be declared in the wheel's own metadata (Requires-Dist); a module-level import must be a core dependency,
# an import inside a function may come from an extra (obstore for s3://; dvclive, optional: dev).
IMPORT_CHECK = textwrap.dedent("""
    import ast, importlib.metadata as md, pathlib, re, sys
    import pipeline

    def norm(name):
        return re.sub(r"[-_.]+", "-", name).lower()

    core, extra = set(), set()
    for req in md.requires("pipeline") or []:
        name = norm(re.match(r"[A-Za-z0-9._-]+", req).group(0))
        (extra if "extra ==" in req else core).add(name)
    providers = md.packages_distributions()
    problems, seen = [], set()
    for path in sorted(pathlib.Path(pipeline.__file__).parent.rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, (ast.Try, ast.If))
                                            for n in ast.walk(s)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for mod in {n.split(".")[0] for n in names}:
                if mod in sys.stdlib_module_names or mod == "pipeline" or mod == "__future__":
                    continue
                dists = {norm(d) for d in providers.get(mod, [])}
                seen.add(mod)
                allowed = core if id(node) in top else core | extra
                if not dists & allowed:
                    where = "module level" if id(node) in top else "in a function"
                    problems.append(f"{path.name}: import {mod} ({where}) from {sorted(dists) or 'no distribution'}"
                                    f" is not declared")
    print("checked imports:", " ".join(sorted(seen)))
    print("\\n".join(problems) or "all declared")
    sys.exit(1 if problems else 0)
""")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, environment, its site-packages) with the wheel built from a copy of the checkout installed;
    the checkout is not importable."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = copy_checkout(tmp / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), str(src)],
         tmp)
    wheel = next(tmp.glob("pipeline-*.whl"))
    py, env, site = _venv(tmp / "venv")
    # env: no PYTHONPATH, or pip would take a checkout on it (its pipeline.egg-info) for the installed package
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
         tmp, env)
    return py, env, site


def _venv(venv: Path):
    """A fresh venv without the checkout that reaches this interpreter's packages (pip included) by a .pth line;
    pip run in it installs into it and never uninstalls outside it. (python, environment, site-packages)."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], venv.parent)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME") and not k.startswith("PIP_")}
    env.update(OMP_WAIT_POLICY="PASSIVE", PYTHONNOUSERSITE="1", VIRTUAL_ENV=str(venv),
               PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return py, env, site


def _run(cmd, cwd, env=None, timeout=600):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_the_installed_package_is_the_wheel_and_carries_its_config(installed, tmp_path):
    py, env, site = installed
    out = _run([py, "-c", "import pipeline, pipeline.compose as c; print(pipeline.__file__); print(c.CONF)"],
               tmp_path, env)
    where, conf = out.split()
    assert Path(where).is_relative_to(site) and Path(conf).is_relative_to(site), out
    assert not Path(where).is_relative_to(REPO) and (Path(conf) / "config.yaml").is_file()
    assert sorted(p.relative_to(conf).as_posix() for p in Path(conf).rglob("*.yaml")) == sorted(
        p.relative_to(REPO / "pipeline" / "conf").as_posix() for p in (REPO / "pipeline" / "conf").rglob("*.yaml"))


def test_every_import_is_a_declared_dependency(installed, tmp_path):
    py, env, site = installed
    proc = subprocess.run([str(py), "-c", IMPORT_CHECK], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch" in proc.stdout and "zarr" in proc.stdout and "all declared" in proc.stdout, proc.stdout
    # the check catches an undeclared one: boto3 is installed here (moto brings it) but not declared
    probe = site / "pipeline" / "_probe.py"
    probe.write_text("import boto3\n")
    try:
        proc = subprocess.run([str(py), "-c", IMPORT_CHECK], cwd=tmp_path, env=env, capture_output=True, text=True)
    finally:
        probe.unlink()
    assert proc.returncode == 1 and "_probe.py: import boto3 (module level)" in proc.stdout, proc.stdout


# An NGC container's torch and torchvision: local pre-release versions, which pip keeps (installed, not chosen).
NGC = {"torch": "2.6.0a0+ecf3bae40a.nv25.1", "torchvision": "0.20.0a0"}


@pytest.mark.slow
def test_install_doc_commands_run_as_written(tmp_path):
    """docs/install.md's bash blocks, in order, offline, in a fresh venv that holds the dependencies: the first
    under an NGC container's torch/torchvision (kept), the second with CI's constraints, the third from anywhere."""
    codes = [b.code for b in blocks(page=REPO / "docs" / "install.md") if b.lang == "bash"]
    assert len(codes) == 3 and "pip install ." in codes[0] and "-c constraints.txt" in codes[1], codes
    src = copy_checkout(tmp_path / "src")
    py, env, site = _venv(tmp_path / "venv")
    (tmp_path / "tmp").mkdir()
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0",
               PIP_DISABLE_PIP_VERSION_CHECK="1", TMPDIR=str(tmp_path / "tmp"))  # offline, this machine's config out
    fakes = [site / f"{name}-{version}.dist-info" for name, version in NGC.items()]
    for (name, version), d in zip(NGC.items(), fakes):  # found before the real ones: pip sees these versions
        d.mkdir()
        (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (d / "INSTALLER").write_text("test\n")
    out = _bash(codes[0], src, env)
    installed = [line for line in out.splitlines() if line.startswith("Successfully installed")]
    assert installed == ["Successfully installed pipeline-0.1.0"], out[-3000:]
    for name, version in NGC.items():  # "Requirement already satisfied: torch<3,>=2.4 in <site> (from ...) (<v>)"
        assert re.search(rf"already satisfied: {name}[<>=,.\d]* in {re.escape(str(site))} .*\({re.escape(version)}\)",
                         out), out[-3000:]
    for d in fakes:
        shutil.rmtree(d)
    out = _bash(codes[1], src, env)
    assert "Successfully installed pipeline-0.1.0" in out and "torch==2.14.1" not in out, out[-3000:]
    out = _bash(codes[2], src, env)
    assert "train\nval\n" in out, out  # ls data/shards/toy
    (shards,) = (tmp_path / "tmp").glob("tmp.*/data/shards/toy/train")
    assert len(list(shards.glob("shard-*.tar"))) == 1  # 128 samples, shard_size 256
    where = _run([py, "-c", "import pipeline; print(pipeline.__file__)"], tmp_path, env).strip()
    assert Path(where).is_relative_to(site), where


def _bash(code: str, cwd: Path, env: dict) -> str:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{code} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_toy_stages_run_from_the_wheel_outside_the_checkout(installed, tmp_path):
    py, env, _ = installed
    for stage in ("make_shards", "train_teacher", "teacher_cache", "train_student"):
        proc = subprocess.run([str(py), "-m", f"pipeline.{stage}", *TINY], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{stage} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    assert len(list((tmp_path / "data" / "shards" / "toy" / "train").glob("shard-*.tar"))) == 2
    assert list((tmp_path / "cache").glob("toy-*.zarr"))
    assert (tmp_path / "runs" / "student" / "toy-hard-cache" / "student.pt").is_file()


def test_constraints_lock_one_set_inside_the_declared_ranges():
    """constraints.txt pins exactly one version of declared dependencies, each inside pyproject's range, and CI
    installs with it (pip's -c)."""
    import tomllib

    from packaging.requirements import Requirement

    declared = {Requirement(r).name.lower(): Requirement(r).specifier
                for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    pins = [Requirement(line) for line in (REPO / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert {"torch", "torchvision", "pillow", "simplejpeg"} <= {p.name.lower() for p in pins}
    for pin in pins:
        (spec,) = pin.specifier
        assert spec.operator == "==", pin
        assert pin.name.lower() in declared, f"{pin} is not a declared dependency"
        assert spec.version in declared[pin.name.lower()], f"{pin} is outside pyproject's {declared[pin.name]}"
    for name in ("torch", "torchvision", "pillow"):
        assert not any(s.operator == "==" for s in declared[name]), f"{name} is pinned in pyproject: range it"
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.count("pip install -c constraints.txt -e '.[dev]'") == 2 and "pip install -e" not in ci
