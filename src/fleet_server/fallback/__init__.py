"""Cloud fallback: the worker that answers devices' fallback requests with the model version each
device runs.
"""
