"""QAT on transformers' Trainer: arguments, the Trainer subclass, one run end to end."""
