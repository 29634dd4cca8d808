"""Rendering a face back into its frame: crops, masks, blending, sharpening, and their torch versions."""
