"""Training: data preparation and audit, the trainer, the evaluator, the job worker, and
the demo base model (``training.demo_base``) that stands in for a hub model."""
