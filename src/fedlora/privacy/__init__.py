"""Differential privacy for the clients' local training (issue #19): sample-level DP-SGD on the
trainable LoRA parameters (:mod:`fedlora.privacy.dpsgd`)."""
