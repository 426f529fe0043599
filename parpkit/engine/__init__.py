"""The engine: one pruning run from a resolved recipe to a run directory.

- ``lifecycle``: ``run`` (prepare → start → phases → judge → write)
- ``training``: the transformers ``Trainer`` glue (arguments, gradient hooks, callbacks)
- ``checkpoints``: parpkit's state beside the Trainer's, complete-or-ignored, and where to resume
- ``evaluation``: decoding and scoring
- ``rundir``: the run directory and its files
"""

from parpkit.engine.evaluation import evaluate
from parpkit.engine.lifecycle import run

__all__ = ["evaluate", "run"]
