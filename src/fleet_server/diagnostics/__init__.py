"""Remote diagnostics: commands the server signs for one device or a group (logs, support
bundle, restart, health check, ping), their pending state and the answers devices upload
(issue 15). Import each name from its module; this package re-exports nothing.
"""
