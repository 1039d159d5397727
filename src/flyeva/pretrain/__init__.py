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
    # the miniature recipe trains its tiny CLIP teacher first (teacher.train_recipe)
    prepare="flyeva.tasks.demo.teacher:ensure_recipe_teacher",
    primary="",
)
STAGES = (PRETRAIN,)
