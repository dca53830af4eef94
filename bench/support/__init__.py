"""Code the bench scripts share. Nothing here is a script: each script imports from here,
never from another script."""
