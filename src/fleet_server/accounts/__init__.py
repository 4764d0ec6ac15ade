"""Operator accounts: roles and what each may do, password hashing, per-account API tokens,
console sessions with CSRF protection (issue 14). Import each name from its module; this
package re-exports nothing.
"""
