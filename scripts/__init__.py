"""Command-line tools beside the package: ``checks/`` (CI and release checks: remote code across
transformers versions) and ``experiments/`` (the sentiment studies and chat samples behind docs/).
"""
