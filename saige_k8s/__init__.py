"""saige-k8s: SAIGE's RL-to-SFT loop as Kubernetes batch jobs (or on one machine)."""

__version__ = "0.1.0"
