"""Where a study's trials run: ONE worker loop, started in several places.

A **worker** takes a budget ticket, asks the study for a trial, trains it in its own
process (reporting every epoch to the Optuna storage, where the pruner decides), tells
the study the result, and repeats until the budget, the gate or a stop ends it
(:class:`~mlops_tune.workers.loop.WorkerLoop`). Every worker of a study runs that same loop on
the same storage, budget and parent run; the storage is the queue, nobody pushes work.

Where workers run:

* the study's own process (``runner=inprocess``: always one worker, the embedded default);
* local helper processes (``study.n_jobs`` > 1), started and supervised with
  :mod:`multiprocessing` (:class:`~mlops_tune.workers.local.LocalProcesses`);
* MLflow Project runs (``runner=mlflow``), in the model family's container for
  ``runner=docker`` (:class:`~mlops_tune.workers.projects.ProjectWorkers`), started with
  ``mlflow.projects.run`` and reaching a container's study through Optuna's storage proxy;
* another machine: ``mlops-tune`` started there on the same storage and tracking server
  joins the study as a worker (``docs/scale-out.md``).

:class:`~mlops_tune.workers.plan.Plan` is what every worker builds from the study's config
once it passed its checks.

Nothing is imported here: a helper process imports only ``mlops_tune.workers.helper`` before it
turns the garbage collector off.
"""

#: the files of a Project worker's folder (:mod:`mlops_tune.workers.projects` writes them,
#: ``python -m mlops_tune.worker FOLDER`` reads them)
CONFIG_FILE, ASSIGNMENT_FILE = "config.yaml", "assignment.yaml"
