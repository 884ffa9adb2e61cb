"""The names a study writes on Optuna trials (user attributes), in one place.

Trial attributes are part of the public contract: ``trials.csv``, the MLflow run tags
and other workers of the same study read them.
"""

#: the trial a mutation started from: a trial number, :data:`BASE` or :data:`ROOT`
PARENT = "parent_trial"
#: the mutation operators applied, ``key:operator`` joined by commas
MUTATIONS = "mutations"
#: ``parent_trial`` of trial 0, the base model as configured: it has no parent
ROOT = "none"
#: ``parent_trial`` of a mutation of the base model made before any trial completed
BASE = "base"

#: the trial's MLflow child run, and the study's parent run (a study attribute)
RUN = "mlflow_run_id"
PARENT_RUN = "mlflow_parent_run_id"
#: the logged model of a trial that was the best so far when it finished
MODEL_URI = "model_uri"
#: why the model failed (the trial counts against the budget)
ERROR = "error"
#: the trial ticket (``claims``) a trial holds: ``name value``
TICKET = "ticket"
#: why a trial did not train (the environment failed, the process was stopped): not charged
NOT_CHARGED = "not_charged"
#: the number of the trial a retried trial repeats
RETRY_OF = "retry_of"
#: wall seconds of the trial
SECONDS = "seconds"
#: where they went, one attribute (each is a storage write, through the proxy for a container):
#: ``{"fit": s, "evaluate": s, "report": s}``, ``report`` being the part of ``fit`` spent reporting
#: epochs to Optuna (and asking whether to prune)
TIMES = "times"
#: the trial's model size and prediction latency (ms per sample, validation split): gate constraints
N_PARAMS = "n_params"
PREDICT_MS = "predict_ms"
#: gate.confirm > 1: the validation accuracy of every seed (the trial's own first) and their mean
CONFIRM_VALUES = "confirm_values"
CONFIRMED_MEAN = "confirmed_mean"
#: trial 0 of a study started from the registry's champion: which version
START = "start_from"
#: study attribute: the fingerprint of the data the study ran on (data.fingerprint)
DATA_FINGERPRINT = "data_fingerprint"
#: study attribute: what its trials answer (``study.runs.objective_of``: model, search space, data settings)
OBJECTIVE = "objective"
#: study attribute: the gate of its first verdict (a later one with another gate is logged beside it)
JUDGED_GATE = "judged_gate"
#: a trial stopped at an epoch because a trial of another worker met the gate (study.n_jobs > 1)
GATE_STOP = "stopped_by_gate"
