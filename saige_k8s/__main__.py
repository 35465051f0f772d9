"""The entry point (``saige-k8s`` and ``python -m saige_k8s``): signal handlers first, then the
(heavier) command line, so a signal while its modules load still ends the process cleanly."""

from saige_k8s import lifecycle
from saige_k8s.errors import Interrupted


def main() -> None:
    try:
        lifecycle.install()
        from saige_k8s.cli import main as run_cli
    except Interrupted as exc:
        lifecycle.stopped(str(exc), exc.exit_code)
    run_cli()


if __name__ == "__main__":
    main()
