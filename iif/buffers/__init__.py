"""Replay buffers (config group ``buffer``)."""
