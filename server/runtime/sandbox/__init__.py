"""The sandbox's process machinery: the launcher that starts isolated workers.

``Launcher`` (server side) runs a dedicated launcher process, exec'd with a minimal environment,
that forks every sandbox worker; ``_zygote`` is the code of that process. Nothing here imports
gRPC: the launcher process must never hold gRPC state.
"""

from tensorline.server.runtime.sandbox._launcher import Launcher, LauncherGone, minimal_environment

__all__ = ["Launcher", "LauncherGone", "minimal_environment"]
