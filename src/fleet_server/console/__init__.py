"""The operator's web console, served by ``fleet-server serve`` on the admin listener:
server-rendered pages over the same service the admin API uses, every asset shipped in the
package (issue 14). Import each name from its module; this package re-exports nothing.
"""
