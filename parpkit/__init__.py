"""parpkit: pluggable pruning for speech recognition models (PARP and its baselines).

Everything a plugin or a notebook may use is exported here, and only this is documented and kept
stable; the submodules are the engine's own business.
"""

from parpkit.api import RunResult, run
from parpkit.audio import AudioError, read_audio, resample
from parpkit.cache import install_atomically
from parpkit.compact import kept_units, load_compact, remove_units
from parpkit.sparse import load_sparse, read_sparse, save_sparse
from parpkit.context import CalibrationBatch, RunContext, TrainingSettings, layer_blocks
from parpkit.errors import ModelFormatError, ParpkitError, PluginError, RecipeError
from parpkit.hookspecs import hookimpl
from parpkit.interfaces import (Backbone, Criterion, Dataset, Phase, PluginOptions, Pruner, PruningCriterion,
                                ReconstructingCriterion, Schedule, StructuredCriterion, Utterance)
from parpkit.metrics import error_rates, normalise, normalise_units
from parpkit.progress import Progress, Task
from parpkit.ramps import cubic_ramp, linear_ramp
from parpkit.selection import PrunePlan, as_rows, lowest_k, lowest_k_rows, n_of_m_prune, row_counts, split_count
from parpkit.units import Member, UnitGroup, ffn_group, head_group
from parpkit.version import __version__

__all__ = [
    # plugin interfaces and registration
    "Backbone", "Dataset", "Utterance", "Criterion", "PruningCriterion", "StructuredCriterion", "ReconstructingCriterion",
    "Schedule", "Phase", "Pruner", "PluginOptions", "hookimpl",
    # what plugins may read of a run, and calibration
    "RunContext", "TrainingSettings", "CalibrationBatch", "layer_blocks",
    # for schedule authors; exact selection for criteria that choose their own masks
    "linear_ramp", "cubic_ramp", "lowest_k", "lowest_k_rows", "split_count", "as_rows", "row_counts", "n_of_m_prune",
    "PrunePlan",
    # helpers for plugins
    "ParpkitError", "RecipeError", "PluginError", "ModelFormatError", "AudioError", "read_audio", "resample",
    "install_atomically", "Progress", "Task", "error_rates", "normalise", "normalise_units",
    "UnitGroup", "Member", "ffn_group", "head_group",
    # for backbones that export: the units a pruned model still uses, and removing the others in place
    "kept_units", "remove_units",
    # running recipes from Python
    "run", "RunResult", "load_compact",
    # exported models: bitmask-compressed sparse weights
    "load_sparse", "read_sparse", "save_sparse",
    "__version__",
]
