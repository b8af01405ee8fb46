"""Length-bucketed, paired comparison of loss reductions from the training runs in MLflow."""
