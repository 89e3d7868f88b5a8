"""The shipped device classes and training profiles (YAML), installed as ``edge_runtime.profiles``.

This folder is the one users read and copy; ``edge_runtime.device.profiles`` reads it with
``importlib.resources`` from the installed package (wheel or editable checkout alike).
"""
