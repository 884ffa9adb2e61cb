"""How a study searches: the search space of a model (``space``), the mutation sampler
(``mutate``), the accuracy gate (``gate``) and the Optuna sampler, pruner and storage a
study is made of (``optuna_setup``)."""
