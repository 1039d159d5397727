"""MIM pretraining (paper section 2): `flyeva pretrain [--config RECIPE] [key=value ...]`.

Import-light on purpose: the CLI imports this package to register the stage.
"""

from flyeva.engine.stage import Stage

HELP = "MIM pretraining (default: the miniature recipe)"
PRETRAIN = Stage(
    command="pretrain",
    verb="",
    help=HELP,
    config="flyeva.pretrain.config:PretrainConfig",
    build="flyeva.pretrain.run:build_pretrain",
    check="flyeva.pretrain.config:check_pretrain_config",
    # run by the CLI: the miniature recipe trains its tiny CLIP teacher first (`flyeva clip train`)
    prepare="flyeva.tasks.clip.teacher:ensure_recipe_teacher",
    primary="",
)
STAGES = (PRETRAIN,)
