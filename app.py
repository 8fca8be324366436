"""The stylelora web app: `python app.py [--host 127.0.0.1] [--port 7860] [--share] [--adapters-dir outputs]`.

Thin on purpose: everything lives in stylelora.app (the same as `stylelora app`).
"""
import sys

from stylelora.app.launch import main

if __name__ == "__main__":
    sys.exit(main())
