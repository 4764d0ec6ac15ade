"""edgefleet's fleet side (registry, MQTT gateway, rollouts); see issue tracker for scope."""

__all__: list[str] = []
