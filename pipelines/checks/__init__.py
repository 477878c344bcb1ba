"""Checks on an audit: gates and verdicts, Clever-Hans findings, the sanity check."""
