"""What a run needs around the maths: run storage, best weights, MLflow tracking and its tag
names, reporting, signals, progress and logging."""
