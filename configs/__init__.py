"""Model and training configurations, each a plain Python module."""
