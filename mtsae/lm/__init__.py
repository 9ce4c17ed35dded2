"""Language-model access: loading a model and tokenizer, reading text datasets, packing documents into
rows, reading and splicing the residual stream, the hub check, and a tiny test LM."""
