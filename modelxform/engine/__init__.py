"""Running a compiled recipe on a model: one context, the selectors, the runner and the Plan.

- plan.py: the Plan (what every statement resolved to and changes), parameters and the seed of a run;
- context.py: the one run context, whose model starts as the .keras archive and becomes a built Keras
  model only when a statement needs one — the whole API a statement's pass uses;
- selectors.py: which layers a selection, a reference or a predicate names;
- runner.py: the statements bound one after the other.
"""
