"""Length-bucketed, paired comparison of loss reductions from the harness's MLflow runs."""
