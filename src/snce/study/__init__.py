"""The CE-vs-SNCE study: ``snce study --config configs/study/mnist.yaml [--quick] [--set key=value]``."""

from snce.study.config import StudyConfig, StudySetting, load_study_config
from snce.study.report import analyse
from snce.study.run import SettingsChanged, run_study
from snce.study.stats import area_under_curve, first_reach, paired_difference, t_interval, verdict

__all__ = [
    "SettingsChanged",
    "StudyConfig",
    "StudySetting",
    "analyse",
    "area_under_curve",
    "first_reach",
    "load_study_config",
    "paired_difference",
    "run_study",
    "t_interval",
    "verdict",
]
