"""parpkit: pluggable pruning for speech recognition models (PARP and its baselines)."""

from parpkit.hookspecs import hookimpl
from parpkit.interfaces import Backbone, Dataset, Phase, PruningCriterion, Schedule, Utterance

__version__ = "0.1.0"
__all__ = ["Backbone", "Dataset", "Phase", "PruningCriterion", "Schedule", "Utterance", "hookimpl", "__version__"]
