"""Evaluations: core (reconstruction, CE/KL scores), disentanglement, unlearning and synthetic unlearning."""
