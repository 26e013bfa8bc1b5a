"""Behaviors bundled with vaurien: one plugin per module, found at start-up
like any user's plugin (installed, this package is vaurien_behaviors)."""
