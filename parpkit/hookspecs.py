"""Every extension point of parpkit. A plugin implements any of these with ``@hookimpl``.

Each hook receives a ``register`` callback; call it once per class you provide::

    @hookimpl
    def register_criteria(register):
        register(MyCriterion)          # MyCriterion.name is the name recipes use
"""

import pluggy

hookspec = pluggy.HookspecMarker("parpkit")
hookimpl = pluggy.HookimplMarker("parpkit")


@hookspec
def register_backbones(register):
    """Register Backbone subclasses (models that can be pruned and fine-tuned)."""


@hookspec
def register_criteria(register):
    """Register PruningCriterion or StructuredCriterion subclasses (which weights or units matter)."""


@hookspec
def register_schedules(register):
    """Register Schedule subclasses (when and how much to prune)."""


@hookspec
def register_datasets(register):
    """Register Dataset subclasses (speech corpora)."""
