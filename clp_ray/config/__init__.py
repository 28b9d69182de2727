"""The experiment configuration: one typed pydantic tree (:mod:`.base`, :mod:`.sections`,
:mod:`.experiment`) loaded from layered YAML files with provenance (:mod:`.loader`).
Every key, its type, default and meaning: ``docs/config.md``."""

from clp_ray.config.base import (  # noqa: F401
    ASSETS_DIR,
    PACKAGE_DIR,
    Section,
    Seed,
    default_config_dir,
    resolve_path,
)
from clp_ray.config.experiment import (  # noqa: F401
    ARM_NAME,
    LANG_NAME,
    METRIC_NAMES,
    AblationConfig,
    ArmConfig,
    EvalConfig,
    ExperimentConfig,
    GeneratorConfig,
    MiningConfig,
    RayConfig,
    SearchConfig,
    ServeConfig,
    TrackingConfig,
)
from clp_ray.config.loader import (  # noqa: F401
    apply_overrides,
    build_config,
    known_languages,
    known_profiles,
    load_config,
    load_yaml_layer,
    parse_set,
)
from clp_ray.config.sections import (  # noqa: F401
    MODEL_SETTINGS,
    DataConfig,
    DeepSpeedConfig,
    HybridWeights,
    LossConfig,
    M3LossConfig,
    ModelConfig,
    MoEConfig,
    RouterConfig,
    TinyModelConfig,
    TrainConfig,
)
