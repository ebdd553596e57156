"""`python -m control_plane.profiler` = `tandem profile`."""

from control_plane.profiler.command import profile_app

profile_app()
