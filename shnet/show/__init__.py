"""``shnet show``: what a cache holds for an image, drawn in panels, and a static HTML contact sheet."""
