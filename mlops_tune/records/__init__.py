"""Where a study's records live: the store checks (``stores``), MLflow runs and their writes
(``tracking``, ``backlog``), the Model Registry (``registry``) and the once-only claims a
study makes in its Optuna storage (``claims``)."""
