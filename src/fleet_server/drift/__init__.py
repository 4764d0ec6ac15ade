"""Fleet-wide drift: merging device sketches, the drift report, and the service behind the admin
endpoints.

Pure, bottom up: ``cohorts`` (cohort specs, device windows, merge keys), ``results`` (scored cells
and their JSON form), ``fleet`` (exact merges and scoring with the agent's own rules), ``report``
(charts). ``service`` reads telemetry and bundles and hands them to ``fleet``. Import each name
from its module; this package re-exports nothing.
"""
