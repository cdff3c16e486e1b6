"""graygate: a traffic-splitting reverse proxy for gray releases."""

__version__ = "0.1.0"

# Before any submodule loads: decides whether the compiled extensions may be used.
import proxy.build  # noqa: F401
