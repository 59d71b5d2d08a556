"""The shared DEQ backbone: solvers, gradient estimators, cells, models and the model zoo."""
