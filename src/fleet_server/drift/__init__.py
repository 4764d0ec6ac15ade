"""Fleet-wide drift: merging device sketches, the drift report, and the service behind the admin
endpoints.
"""
