"""Kept at this documented import path; the code lives in `trimllama.harness.visualize`."""

from .harness.visualize import *  # noqa: F401,F403
