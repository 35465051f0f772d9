"""``python -m saige_k8s``: signal handlers first, then the (heavier) command line."""

from saige_k8s import lifecycle
from saige_k8s.errors import Interrupted

try:
    lifecycle.install()
    from saige_k8s.cli import main
except Interrupted as exc:
    lifecycle.stopped(str(exc), exc.exit_code)

main()
