"""DeiT's recipe card and the economics table, on the documented ImageNet run (docs/operations.md).

After the documented run or the recipe changes, `python tests/test_recipe.py --regenerate` rewrites the tables of
docs/recipe.md and docs/economics.md (between their markers) with the output of the pages' own commands.

The run is read from docs/operations.md at test time (its `R="..."` line and the overrides its stage commands add), the
commands of docs/recipe.md and docs/economics.md run as written, and their output must be the tables the pages
show. Every row the card marks "same" must equal DeiT's value, every "differs" row must carry a reason; a drift
(train.lr changed) must show as a row without one. The command writes nothing.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.compose import compose
from pipeline.config import validate
from pipeline.errors import ConfigError
from pipeline.train import economics
from pipeline.train import recipe_card as card
from pipeline.train.recipe_ingredients import INGREDIENTS

REPO = Path(__file__).resolve().parents[1]
SECTION = "ImageNet (or any folder)"


def _section_block(text: str, heading: str) -> str:
    """The first ```bash block after the first heading line that contains ``heading``."""
    start = re.search(rf"^#+ .*{re.escape(heading)}", text, re.M)
    assert start, f"no heading with {heading!r}"
    return re.search(r"```bash\n(.*?)```", text[start.start():], re.S).group(1)


def _stage_overrides(block: str, stage: str) -> tuple[str | None, list[str]]:
    """(NPROC, overrides after $R) of the documented line that runs ``stage`` (None, [] without one)."""
    line = next((ln for ln in block.splitlines() if f"{stage} $R" in ln), None)
    if line is None:
        return None, []
    nproc = re.search(r"NPROC=(\d+)", line)
    after = line.split("$R", 1)[1].split("#", 1)[0]
    return (nproc.group(1) if nproc else None), after.split()


@pytest.fixture(scope="module")
def documented():
    return documented_run()


def documented_run() -> dict:
    """R, the overrides the stage commands add, and NPROC of stage two (its line's, else the block's export),
    from docs/operations.md."""
    block = _section_block((REPO / "docs" / "operations.md").read_text(), SECTION)
    r = re.search(r'^R="(.*?)"', block, re.S | re.M).group(1)
    r = " ".join(r.replace("\\\n", " ").split())
    _, stage_one = _stage_overrides(block, "teacher_cache")
    nproc, stage_two = _stage_overrides(block, "train_student")
    exported = re.search(r"^export (?:.* )?NPROC=(\d+)", block, re.M)  # the block's own NPROC, for every stage
    extra = list(dict.fromkeys(stage_one + stage_two))
    return {"R": r, "extra": extra, "nproc": nproc or (exported.group(1) if exported else "1")}


def _docs_commands(page: str) -> list[str]:
    return [ln.strip() for ln in _section_block((REPO / page).read_text(), "").splitlines()
            if "python -m pipeline.recipe" in ln]


def _run(command: str, r: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "R": r, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", **(env_extra or {})}
    env.pop("NPROC", None)
    env.pop("NNODES", None)
    command = command.replace("python -m", f"{sys.executable} -m", 1)
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _rows(documented, *more: str) -> tuple[list[card.Row], card.Run]:
    cfg = validate(compose(documented["R"].split() + documented["extra"] + list(more)))
    from omegaconf import OmegaConf

    OmegaConf.resolve(cfg)
    run = card.Run(cfg, card.world_size(cfg, {"NPROC": documented["nproc"]}))
    return card.rows(run, INGREDIENTS), run


@pytest.mark.slow
def test_docs_commands_print_the_pages_tables(documented):
    """docs/recipe.md's and docs/economics.md's commands, run as written with the documented R (from the repo root,
    as the docs run commands), print exactly the tables the pages show; the card's command adds the
    documented stage commands' overrides and their NPROC."""
    (recipe_cmd,) = _docs_commands("docs/recipe.md")
    (econ_cmd,) = _docs_commands("docs/economics.md")
    assert recipe_cmd.startswith(f"NPROC={documented['nproc']} "), recipe_cmd
    assert recipe_cmd.split("$R", 1)[1].split() == documented["extra"], (recipe_cmd, documented["extra"])
    for page, cmd in (("docs/recipe.md", recipe_cmd), ("docs/economics.md", econ_cmd)):
        out = _run(cmd, documented["R"], REPO)
        assert out.returncode == 0, out.stderr
        assert "no recorded reason" not in out.stderr, out.stderr
        assert out.stdout.strip() and out.stdout in (REPO / page).read_text(), (
            f"{page} is not the output of `{cmd}` with the documented R; regenerate it. Output:\n{out.stdout}")


def _equal(ours, deit) -> bool:
    if isinstance(deit, (tuple, list)):
        return isinstance(ours, (tuple, list)) and len(ours) == len(deit) and all(map(_equal, ours, deit))
    if isinstance(deit, float) and not isinstance(ours, bool):
        return isinstance(ours, (int, float)) and math.isclose(ours, deit, rel_tol=1e-9)
    return type(ours) is type(deit) and ours == deit


def test_same_rows_equal_deit_and_differences_carry_reasons(documented):
    table, run = _rows(documented)
    assert not card.drifts(table), [r.name for r in card.drifts(table)]
    for row in table:
        if row.same:
            assert _equal(row.ours_value, row.deit_value), row
        else:
            assert row.reason and len(row.reason) > 20, row
    by = {r.name: r for r in table}
    # the headline numbers, independently of the card's own comparison
    assert run.global_batch == 1024 and by["global batch"].same
    assert math.isclose(float(run.cfg.train.lr) * run.global_batch / 512, 1e-3)
    assert math.isclose(by["learning rate"].ours_value[1], 1e-3)  # the rate student_run.py computes, evaluated
    assert by["optimizer"].ours_value == "AdamW" and by["optimizer eps"].ours_value == 1e-8
    assert bool(run.cfg.train.ema) and float(run.cfg.train.ema_decay) == 0.99996
    assert str(run.cfg.teacher.name) == "regnety_160.deit_in1k" and str(run.cfg.distill.mode) == "hard"
    assert by["eval prediction"].ours_value == "average of both heads"


def test_a_drift_from_deit_shows_as_a_row_without_reason(documented):
    """Someone sets train.lr (or turns EMA off): the card marks those rows as differing with no reason."""
    table, _ = _rows(documented, "train.lr=1e-3", "train.ema=false")
    assert {r.name for r in card.drifts(table)} == {"learning rate", "EMA"}
    assert all(r.verdict == card.NO_REASON for r in card.drifts(table))
    out = _run(f"python -m pipeline.recipe $R {' '.join(documented['extra'])} train.lr=1e-3", documented["R"], REPO,
               {"NPROC": documented["nproc"]})
    assert out.returncode == 0, out.stderr
    assert "| learning rate |" in out.stdout and card.NO_REASON in out.stdout
    assert "recipe: note: learning rate differs from DeiT" in out.stderr


@pytest.mark.slow
def test_recipe_writes_nothing(documented, tmp_path):
    """Run from an empty folder with workdir and HOME there: the folder stays empty, the checkout unchanged."""
    def snapshot(root: Path) -> dict:
        return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
                if ".git" not in p.parts and ".venv" not in p.parts and "__pycache__" not in p.parts}

    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir(), home.mkdir()
    before = snapshot(REPO)
    for cmd in (f"python -m pipeline.recipe $R {' '.join(documented['extra'])} workdir={work}",
                f"python -m pipeline.recipe --economics $R workdir={work}"):
        out = _run(cmd, documented["R"], work, {"HOME": str(home), "NPROC": documented["nproc"]})
        assert out.returncode == 0, out.stderr
        assert "| ingredient |" in out.stdout or "| quantity |" in out.stdout
    assert list(work.iterdir()) == [] and list(home.iterdir()) == []
    assert snapshot(REPO) == before


def test_bad_override_is_one_line_exit_2(documented):
    out = _run("python -m pipeline.recipe $R train.lrr=1", documented["R"], REPO)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "train.lrr" in out.stderr, out.stderr
    assert out.stdout == ""


def test_world_size_reads_nproc_and_nnodes_and_refuses_words():
    cfg = compose()
    assert card.world_size(cfg, {}) == int(cfg.train.nproc)
    assert card.world_size(cfg, {"NPROC": "8", "NNODES": "2"}) == 16
    with pytest.raises(ConfigError, match="NPROC=eight"):
        card.world_size(cfg, {"NPROC": "eight"})


def test_economics_arithmetic():
    """The break-even the table states: at S = E x r one student costs the cache the teacher forwards of one
    online run; each further student saves N x E x r; the given anchors agree with a serial online step."""
    fresh = economics.costs(economics.Inputs(n=1000, epochs=300, repeats=1, seeds=300))
    assert fresh["break_even_forwards"] == 1.0 and fresh["cache_forwards"] == fresh["views"] == 300_000
    third = economics.costs(economics.Inputs(n=1000, epochs=300, repeats=1, seeds=100))
    assert math.isclose(third["break_even_forwards"], 1 / 3) and third["h_online"] == fresh["h_online"]
    a = economics.ANCHORS
    serial = 1 / (1 / a["student_pure"] + 1 / a["teacher"])
    assert abs(serial - a["student_online"]) / a["student_online"] < 0.02


@pytest.mark.parametrize("student, model", [("deit_tiny", "deit_tiny_distilled_patch16_224"),
                                            ("deit_small", "deit_small_distilled_patch16_224"),
                                            ("deit_base", "deit_base_distilled_patch16_224")])
def test_each_deit_student_composes_deits_recipe(documented, student, model):
    """DeiT trains Ti, S and B with one recipe (global batch 1024: its README runs Ti/S on 4 GPUs x 256 and B on
    16 x 64; lr 5e-4 x 1024/512; drop path 0.1): under train=deit each student's card has the same rows as the
    documented run's, and its own student row is DeiT's."""
    table, run = _rows(documented, f"student={student}")
    base, _ = _rows(documented)
    by = {r.name: r for r in table}
    assert str(run.cfg.student.name) == model and by["student"].same and by["drop path"].same
    assert by["global batch"].same and by["learning rate"].same and not card.drifts(table)
    assert [(r.name, r.verdict) for r in table] == [(r.name, r.verdict) for r in base]


def test_eval_transform_gap_is_what_the_card_states():
    """The eval row's numbers: our eval views of scikit-image's photos against DeiT's transform (torchvision
    Resize(256, bicubic) then CenterCrop(224) on the PIL image), uint8 levels."""
    import io

    import numpy as np
    import skimage.data
    import torch
    import yaml
    from PIL import Image
    from torchvision import transforms as T

    from pipeline.replay.view_params import AugmentConfig
    from pipeline.replay.views import block_views
    from pipeline.train.recipe_ingredients import EVAL_GAP

    deit_yaml = REPO / "pipeline" / "conf" / "augment" / "deit.yaml"
    cfg = AugmentConfig.from_cfg(yaml.safe_load(deit_yaml.read_text()), 224, 0.875)
    deit = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    for name, (mean, top) in EVAL_GAP.items():
        photo = getattr(skimage.data, name.split()[0])()
        assert "x".join(map(str, photo.shape[:2])) == name.split()[1]
        png = io.BytesIO()
        Image.fromarray(photo).save(png, "PNG")
        ours = block_views([(0, png.getvalue(), 0)], run_seed=0, seed_index=0, cfg=cfg, num_classes=1,
                           train=False)[0]["image"]
        theirs = torch.from_numpy(np.asarray(deit(Image.fromarray(photo).convert("RGB")))).permute(2, 0, 1)
        diff = (ours.int() - theirs.int()).abs()
        assert (round(float(diff.float().mean()), 2), int(diff.max())) == (mean, top), name


GENERATED = re.compile(r"(<!-- generated .*? -->\n).*?(<!-- end generated -->)", re.S)


def regenerate() -> None:
    run = documented_run()
    for page in ("docs/recipe.md", "docs/economics.md"):
        text = (REPO / page).read_text()
        (cmd,) = _docs_commands(page)
        out = _run(cmd, run["R"], REPO)
        if out.returncode != 0:
            raise SystemExit(f"{page}: `{cmd}` failed:\n{out.stderr}")
        (REPO / page).write_text(GENERATED.sub(lambda m: m.group(1) + out.stdout + "\n" + m.group(2), text))
        print(f"{page}: table regenerated")


if __name__ == "__main__" and sys.argv[1:] == ["--regenerate"]:
    regenerate()
