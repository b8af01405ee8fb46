class AnalysisError(Exception):
    """Bad selection or options; the message is one line."""
