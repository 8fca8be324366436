"""The Gradio app: `service` (what the UI does, callable and testable without a browser), `training` (runs
`stylelora train` in a child process and follows it), `ui` (the Blocks layout only) and `launch` (arguments,
serving). Importing this package is cheap: gradio, torch and diffusers load inside functions.
"""
