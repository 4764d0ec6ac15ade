"""Labelled evaluation sets per model name, and the offline comparison that runs on them.

Modules: ``data`` (the set file: strict ``.npz`` reading, canonical bytes and digest),
``store`` (files by digest in the server's state directory, registrations with provenance in
the registry) and ``offline`` (runs the version a rollout replaces and its candidate on the
model's set before the rollout starts; the rollout runner calls it). The comparison itself is
``edge_agent.quality.compare``'s, the admission decision ``fleet_server.rollouts.offline``'s.
"""
