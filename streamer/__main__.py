import sys

from .app.cli import main

if __name__ == "__main__":  # not when a spawned process (replay --processes) imports it as __mp_main__
    sys.exit(main())
