"""graygate: a traffic-splitting reverse proxy for gray releases."""

__version__ = "0.1.0"
