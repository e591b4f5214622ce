"""The CE-vs-SNCE study: ``snce study --config configs/study/digits.yaml [--quick] [--set key=value]``."""

from snce.study.config import StudyConfig, load_study_config
from snce.study.report import headlines, steps_to_reach
from snce.study.run import SettingsChanged, run_study

__all__ = [
    "SettingsChanged",
    "StudyConfig",
    "headlines",
    "load_study_config",
    "run_study",
    "steps_to_reach",
]
