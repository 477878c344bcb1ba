"""The run's configuration: its options, each declared once (options.py), the kinds of value they take
(kinds.py), Beam's options beside ours (beam.py) and the audit spec that sets them from a file
(spec.py)."""


class UsageError(Exception):
    """A bad invocation: reported in one line, before any work starts (exit 2)."""
