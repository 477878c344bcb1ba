"""``python -m saliency_audit COMMAND ...``: the ``saliency-audit`` command (the form launchers use)."""
import sys

from saliency_audit.pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main())
