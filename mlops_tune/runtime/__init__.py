"""What every part of mlops-tune runs on: errors and exit codes, fault and signal handling,
file locks, retries, logging, secrets in URIs, thread and heap settings, and the names of the
attributes a study writes on its trials (``keys``). Nothing here imports the rest of the package."""
