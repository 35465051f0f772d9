"""Where steps run: on this machine (local) or as Kubernetes Jobs; the commands are the same."""
