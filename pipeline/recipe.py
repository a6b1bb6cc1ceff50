"""`python -m pipeline.recipe [overrides]`: DeiT's recipe card for a run; nothing is written.

    NPROC=8 python -m pipeline.recipe $R            # every DeiT ingredient: DeiT's value, source, ours, verdict
    python -m pipeline.recipe --economics $R        # teacher forwards and hours: a cache vs online distillation

Composes pipeline/conf/ with the overrides (the one configuration rule) and prints one markdown table. The global batch
is train.batch_size x NPROC (as stages/launch.sh reads it; else train.nproc) x NNODES. docs/recipe.md and
docs/economics.md hold the tables of the documented ImageNet run (docs/operations.md).
"""

from __future__ import annotations

import sys

from pipeline import cli

ECONOMICS = "--economics"


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        return
    with cli.stage("recipe"):
        from omegaconf import OmegaConf

        from pipeline.compose import compose, split_params
        from pipeline.config import validate

        params, overrides = split_params([a for a in argv if a != ECONOMICS])
        cfg = validate(compose(overrides, params))
        OmegaConf.resolve(cfg)
        if ECONOMICS in argv:
            from pipeline.train import economics

            sys.stdout.write(economics.render(economics.inputs_from(cfg)))
            return
        from pipeline.train import recipe_card as card
        from pipeline.train.recipe_ingredients import INGREDIENTS

        run = card.Run(cfg, card.world_size(cfg))
        table = card.rows(run, INGREDIENTS)
        sys.stdout.write(card.render(table, run))
        for row in card.drifts(table):
            print(f"recipe: note: {row.name} differs from DeiT ({row.deit}) with no recorded reason", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
