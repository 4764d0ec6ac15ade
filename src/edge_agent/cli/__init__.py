"""Command-line interfaces: the ``edge-agent`` command (``main``) and the support every role's CLI
shares (``support``: exit codes and error output; ``extras``: lazy role entry points).
"""
