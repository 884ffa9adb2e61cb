-- docker/compose.yaml: one PostgreSQL for the MLflow backend store (database `mlflow`,
-- created by the image) and the teams' Optuna studies (database `optuna`).
CREATE DATABASE optuna;
