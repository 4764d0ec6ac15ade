"""The ``fleet-server`` command: serve, admin sub-commands, drift and root rotation."""
