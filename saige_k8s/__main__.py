"""The entry point (``saige-k8s`` and ``python -m saige_k8s``): signal handlers first, then the
(heavier) command line, so a signal while its modules load still ends the process cleanly."""

from saige_k8s import lifecycle
from saige_k8s.errors import Interrupted


def main() -> None:
    try:
        lifecycle.install()
        from saige_k8s.cli import main as run_cli

        run_cli()  # it ends the process itself: what reaches here is a stop before its own handling
    except Interrupted as exc:
        lifecycle.stopped(str(exc), exc.exit_code)


if __name__ == "__main__":
    main()
