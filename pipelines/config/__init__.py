"""The run's configuration: command-line options and the audit spec."""
