"""The procedural toy world: renderer, styles, datasets, judge and the toy base build."""
