"""The job, its checks, reports and training tools, and the command line."""
import logging


class _QuietBeamImport(logging.Filter):
    """Beam warns at import that the BigQuery client is missing, which this job never uses."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("apitools not found")


logging.getLogger().addFilter(_QuietBeamImport())
