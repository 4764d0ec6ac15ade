"""X.509 enrollment: the fleet CA, device certificates, the broker's config and ACLs, and trust
root rotation.
"""
