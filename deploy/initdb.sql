-- The Optuna studies' database beside MLflow's (deploy/compose.yaml).
CREATE DATABASE optuna OWNER pneumoseg;
