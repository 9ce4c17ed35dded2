"""Training: the LightningModule (:mod:`mtsae.training.module`), its losses, schedulers and metrics."""
