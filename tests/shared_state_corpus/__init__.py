"""Tool-code shapes for the shared-state detector's corpus (see ``shapes.py``)."""
