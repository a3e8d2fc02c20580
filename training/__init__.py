"""Training: data preparation and checks, the trainer, the evaluator, the job worker, and
the demo base model (``training.demo_base``) that stands in for a hub model."""
