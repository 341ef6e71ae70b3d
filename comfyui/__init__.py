"""embedpin's ComfyUI node pack: Pin and Load pinned (``nodes.py``). Put this folder into
``ComfyUI/custom_nodes/`` and ``pip install embedpin`` into ComfyUI's Python."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
