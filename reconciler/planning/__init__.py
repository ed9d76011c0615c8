"""Planning: desired + observed state → an ordered plan of actions with reasons, pure.

The observed values (:mod:`.observed`), the actions and plans (:mod:`.actions`), the planner
(:mod:`.plan`), the saved-plan fingerprint (:mod:`.fingerprint`) and the text of a plan
(:mod:`.render`). No I/O: :mod:`reconciler.operations.observe` builds the observed state and
:mod:`reconciler.operations.apply` carries a plan out. Nothing is imported here.
"""
